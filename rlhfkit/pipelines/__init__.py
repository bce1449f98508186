"""End-to-end pipelines built from the trainers, labelers and evaluators: the demo, iterative DPO."""
