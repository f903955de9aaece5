"""One module per pipeline stage: ``run(params_path)`` does the stage, a Prefect task wraps it, and
``python -m tasks.<stage>`` (what dvc.yaml calls) runs the same function."""
