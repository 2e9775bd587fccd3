"""The commands around training: launch, Slurm, sweeps, benchmarks, profiling, reports, plots."""
