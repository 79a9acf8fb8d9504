"""Launchers for ``python -m experiments.run``.

``launch.sweep`` runs a config's sweep locally, ``launch.tpu`` on Cloud TPU VMs and
``launch.slurm`` on a Slurm cluster. Every trial resumes from its workdir's last
checkpoint, so the launchers only decide where, and how many times, to run it.
"""
