"""``rlhfkit serve-rollouts``: the rollout server (rlhfkit.rollout.server) for a trainer started with
``--rollout-backend remote --rollout-server URL`` (docs/generation.md, "Server mode")."""

from __future__ import annotations

import argparse

BACKENDS = ("hf", "fast", "vllm")
DTYPES = ("float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhfkit serve-rollouts", description="Serve rollout generation over HTTP: "
                                "a trainer with rollout_backend 'remote' sends prompts here and pushes its "
                                "weights after every update.")
    p.add_argument("--model", required=True, help="the policy the trainer starts from: 'smollm2-135m-instruct', "
                   "'tiny', an HF directory or a hub id (the trainer pushes its weights at start)")
    p.add_argument("--backend", default="hf", choices=BACKENDS, help="hf: transformers generate (any device); fast: "
                   "rlhfkit's int8 CPU engine (Llama models); vllm: a vLLM engine (CUDA, rlhfkit[vllm])")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface; the server "
                   "has no authentication, so expose it only on a trusted network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default=None, choices=DTYPES, help="weights dtype of the served model "
                   "(default float32; vllm: its engine's 'auto')")
    p.add_argument("--device", default=None, help="device of the served model for hf (default: cuda when "
                   "available, else cpu); fast runs on the cpu; vllm keeps a copy on the cpu to check pushes")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="vllm: fraction of the GPU its engine may take (the server has the GPU to itself)")
    return p


def build_app(args: argparse.Namespace):
    """The app for parsed ``args`` (model loaded, backend built)."""
    import torch  # here, not at the top: `rlhfkit serve-rollouts --help` stays fast

    from rlhfkit.models import load_model
    from rlhfkit.models.loading import resolve
    try:
        from rlhfkit.rollout.server import create_app
    except ImportError as e:  # fastapi / uvicorn: the serve extra
        raise SystemExit(f"rlhfkit serve-rollouts needs `pip install 'rlhfkit[serve]'` ({e})") from None

    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype or "float32"))
    backend = None  # hf: the app's HFBackend over the served model
    if args.backend == "hf":
        model.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    elif args.backend == "fast":
        from rlhfkit.rollout.fast import SUPPORTED_MODEL_TYPES, FastBackend

        if model.config.model_type not in SUPPORTED_MODEL_TYPES or args.device not in (None, "cpu"):
            raise SystemExit(f"rlhfkit serve-rollouts: error: --backend fast serves {', '.join(SUPPORTED_MODEL_TYPES)} "
                             f"models on the cpu (got model_type {model.config.model_type!r}, device {args.device!r})")
        backend = FastBackend(model, tok)
    else:
        from rlhfkit.rollout.vllm_backend import VLLMBackend
        from rlhfkit.train.online_rollout import check_backend_available

        try:
            check_backend_available("vllm")
        except ValueError as e:
            raise SystemExit(f"rlhfkit serve-rollouts: error: {e}") from e
        backend = VLLMBackend(resolve(args.model), tok, gpu_memory_utilization=args.gpu_memory_utilization,
                              dtype=args.dtype or "auto")
    return create_app(model, tok, backend, model_name=args.model, backend_name=args.backend)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.gpu_memory_utilization <= 1:
        raise SystemExit("rlhfkit serve-rollouts: error: --gpu-memory-utilization must be in (0, 1]")
    import uvicorn

    app = build_app(args)
    print(f"rlhfkit serve-rollouts: {args.model} ({args.backend}) on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
