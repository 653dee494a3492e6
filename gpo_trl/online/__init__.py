"""The online side of gpo_trl: sampling from a policy, judging the samples, iterative rounds, evaluation by generation.

- `generation`: prompts from a `datasets:` source, batched sampling (transformers' `generate`, or vLLM), and the
  log-probabilities of what was sampled.
- `judges`: judges that score samples (auxiliary rewards, TRL-style reward functions, a reward model, a pairwise
  function) and the pairing rules that turn scored samples into preference pairs.
- `iterate`: `gpo-trl iterate`, rounds of sample -> judge -> pair -> train -> merge.
- `generate_eval`: `gpo-trl evaluate --generate` / `--compare`, a policy against its base by sampling (judge score,
  win rate, length, KL), with bootstrap intervals over prompts.

What it takes from the training core (one direction only: no core module imports this package, except the command
line's lazy imports and `gpo_trl.experiments`): `errors` (the one-line errors), `data` (prompt sources), `inputs`
(file and model checks), `auxiliary` (the registered rewards a judge can name), `recipe` (YAML reading, and the same
`recipe.main` that `gpo-trl train` runs, for each round), `merge` (each round's adapter merge), `atomic`/`guards`
(crash-consistent writes), `demo` (the demo's model) and `cli` (the launch options, reused by `iterate`).

This file imports nothing: `gpo-trl iterate --help` reads the modules' docstrings without importing torch.
"""
