"""
The instruments: what measures the RLHF method in the repository's root without being part of it. Each imports the
core; the core never imports them (rlhf.py's commands import theirs when they run: tests/test_layout.py).

  plan.py      each stage's work, peak memory and time on this device, before a run (`python rlhf.py plan`)
  rates.py     the rates the plan uses, measured here at the preset's shapes or modelled for a named GPU
  bench.py     speed figures as one JSON line (`python rlhf.py bench`)
  bench_hf.py  the race against transformers and TRL (`python -m lab.bench_hf`; an optional extra)
  standin.py   a full-size stand-in of hh-rlhf for timing (`python -m lab.standin --from DIR --to DIR`)
  studies.py   the PM studies that train more PMs (`python rlhf.py studies --studies.ablation=true ...`)
  plot.py      figures from a run's logs (`python rlhf.py plot`; matplotlib is an optional extra)
"""
