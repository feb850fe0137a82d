"""Notebook-driven, reproducible replication of VTP: scalable pre-training of visual tokenizers for generation

Modules:

- `vtp_nbdev.stats`: The one noise model of the reproduction: seed standard deviations with t-intervals, per-seed slopes against log compute, paired tests, single-seed rules, three-way verdicts, partial correlations at fixed compute, power-law fits with bootstrap intervals, and the confirmatory statistics (t critical values, equivalence tests, crossover and final-gap endpoints, Holm over a pre-registered family, seeds for a given power)."""
