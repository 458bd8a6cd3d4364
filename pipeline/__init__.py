"""What the tasks and flows stand on: the stage (``stage.py``: key, folder, claim, publish,
the only cache) and its code digests (``code_digest.py``), MLflow tracking, sweep reports and the
Prefect artifacts. It imports only the library and the configs (tests/test_layers.py).
"""
