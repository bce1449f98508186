# Services the test suite needs, for a fresh Debian 12 machine (run as root). Sourced by .ci/run:
#
#     source .ci/services.sh && make test
#
# - installs chromium (driven by Playwright in tests/test_annotate_browser.py) and postgresql
#   when missing;
# - starts a PostgreSQL cluster listening on 127.0.0.1 only;
# - creates role/database rlhfkit/rlhfkit_test (idempotent) and exports RLHFKIT_TEST_PG.
#
# It is sourced, so it must not `exit` or `set -e` the caller's shell: every step runs in a
# function and failures `return 1` with a message. Safe to source any number of times.

_rlhfkit_services() {
    local need=()
    [ -x /usr/bin/chromium ] || need+=(chromium)
    command -v pg_ctlcluster >/dev/null 2>&1 && ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 \
        || need+=(postgresql)
    if [ "${#need[@]}" -gt 0 ]; then
        echo "services.sh: installing ${need[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null || { echo "services.sh: apt-get update failed" >&2; return 1; }
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null \
            || { echo "services.sh: apt-get install ${need[*]} failed" >&2; return 1; }
    fi

    # The newest installed server version; create its cluster if the package did not.
    local ver
    ver=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
    local row
    row=$(pg_lsclusters -h | awk -v v="$ver" '$1 == v && $2 == "main"')
    if [ -z "$row" ]; then
        pg_createcluster "$ver" main >/dev/null || { echo "services.sh: pg_createcluster failed" >&2; return 1; }
    fi
    # Loopback only: the test machines must not expose a database on other interfaces.
    # (Debian's postgresql.conf ends with include_dir 'conf.d', so this file has the last word.)
    mkdir -p "/etc/postgresql/$ver/main/conf.d"
    echo "listen_addresses = '127.0.0.1'" > "/etc/postgresql/$ver/main/conf.d/rlhfkit-ci.conf"
    row=$(pg_lsclusters -h | awk -v v="$ver" '$1 == v && $2 == "main"')
    local port status
    port=$(echo "$row" | awk '{print $3}')
    status=$(echo "$row" | awk '{print $4}')
    if [ "$status" != online ]; then
        pg_ctlcluster "$ver" main start || { echo "services.sh: could not start PostgreSQL $ver/main" >&2; return 1; }
    fi
    local i
    for i in $(seq 1 30); do
        runuser -u postgres -- pg_isready -q -h 127.0.0.1 -p "$port" && break
        sleep 1
    done
    runuser -u postgres -- pg_isready -q -h 127.0.0.1 -p "$port" \
        || { echo "services.sh: PostgreSQL did not accept connections on 127.0.0.1:$port" >&2; return 1; }

    local psql=(runuser -u postgres -- psql -q -X -v ON_ERROR_STOP=1 -p "$port" -d postgres)
    if [ "$("${psql[@]}" -tAc "SELECT 1 FROM pg_roles WHERE rolname = 'rlhfkit'")" != 1 ]; then
        "${psql[@]}" -c "CREATE ROLE rlhfkit LOGIN PASSWORD 'rlhfkit'" || return 1
    fi
    if [ "$("${psql[@]}" -tAc "SELECT 1 FROM pg_database WHERE datname = 'rlhfkit_test'")" != 1 ]; then
        "${psql[@]}" -c "CREATE DATABASE rlhfkit_test OWNER rlhfkit" || return 1
    fi
    export RLHFKIT_TEST_PG="postgresql+psycopg://rlhfkit:rlhfkit@127.0.0.1:${port}/rlhfkit_test"
    echo "services.sh: chromium $(/usr/bin/chromium --version 2>/dev/null | awk '{print $2}'), PostgreSQL $ver on 127.0.0.1:$port; RLHFKIT_TEST_PG=$RLHFKIT_TEST_PG"
}

_rlhfkit_services
