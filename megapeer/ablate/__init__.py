"""Ablation sweeps (tools/ablate.py) and run progress for the SLURM launcher.

Importing this package is cheap (no torch, no Megatron): the SLURM script calls
`python -m megapeer.ablate.progress` between attempts.
"""
