"""Benchmark data for Quaver.

Modules:
  manifest   the `Item` record, manifest read/write, audio loading (the contract others use)
  signals    numpy signal primitives and the band-limited SNR rule
  scene      event lists + noise beds, rendered reproducibly
  families   the question families of the synthetic benchmark
  generate   `BenchmarkConfig` and `generate_benchmark` (the `quaver data` step)
  checks     independent label checkers (used by the tests)
  speech     optional spoken-word events via espeak-ng
  sources    real recordings from installed Debian packages: index, library, package split
  real_families  question families over real recordings (opt-in: BenchmarkConfig.real_sources)
  real_checks    independent label checkers of the real families (identify what is audible)
  controls   control items (silence, noise, unrelated audio) and abstention on them
  formats    loaders for DCASE 2025 Task 5 / MMAU JSON and Clotho-AQA CSV
"""
