"""What runs the pipeline around the Prefect tasks: the command line, MLflow tracking, the
sweep report and the Prefect artifacts, and the keys of the stage cache.

Dependencies point down: ``pipeline.cli`` drives ``flows``; ``flows`` and ``tasks`` use the rest
of this package; ``ibtpo_core`` imports none of it.
"""
