"""unclip.serve: unCLIP over HTTP on Ray Serve (optional extra `serve`).

    config.py   ServeConfig: model, backend, caps, each stage deployment's replicas and resources
    jobs.py     one Job per image; running a stage over a batch of jobs from different requests (no Ray)
    stages.py   the stage deployments (prior, decoder, sr256, sr1024) with cross-request batching
    schema.py   request bodies -> Settings, checked at the edge
    errors.py   stage failures and uploads -> one-line HTTP errors
    app.py      the FastAPI ingress, build_app(cfg), app_builder(args) for `serve run`
    responses.py  the answers: JSON with base64 PNGs, or one image/png
    config.yaml a `serve run` config for a cluster
    cli.py      unclip-serve
"""
