"""A controlled study in the style of Gao et al. 2023, small enough for a CPU: does every GPO loss trace the same
gold-reward-vs-KL curve, at a best beta that the c_f calibration predicts?

    python -m gpo_trl.experiments.study --config configs/studies/gold_reward.yaml --out docs/study

The task is synthetic but nothing is faked:

1. A programmatic *gold reward* scores token sequences (`gold_reward`): it likes "good" tokens and echoes of the
   prompt, and dislikes repeats, junk tokens and lengths far from a target. The terms pull against each other, so
   pushing one feature too far (e.g. repeating a good token) costs reward.
2. A tiny Llama is *pre-trained* on a synthetic corpus that does not maximise that reward (`make_corpus`), so the base
   LM samples diverse, mediocre completions. Its diversity is measured and reported.
3. Preference pairs: two completions sampled from the base LM per prompt, labelled by Bradley-Terry on the gold reward
   (P(y1 > y2) = sigmoid(r1 - r2), a seeded coin flip).
4. Every loss x beta (and again with `beta_calibration`) is trained with the real `GPOTrainer` (full fine-tuning,
   reference log-probs precomputed once and shared through the trainer's cache). Each policy then samples on
   held-out prompts: mean gold reward, win rate against the base LM, and KL(pi || pi_ref) estimated from the policy's
   own samples (mean of log pi(y|x) - log pi_ref(y|x), sequence level, exact temperature-1 sampling so the estimator
   is unbiased). The offline regulariser 1/2 E_mu[rho^2] is taken from the trainer's `eval_gpo/offline_reg` on
   held-out pairs from the same data distribution mu.

Outputs in --out: results.jsonl / results.csv (one row per loss x beta x calibrated), summary.json (base LM,
diversity, timings), tables.md (best beta per loss vs the c_f prediction), and PNG plots.
"""

from .command import main
from .config import StudyConfig, load_config
from .measure import (completion_mask, diversity, evaluate_policy, rewards, sample, sample_in_batches,
                      sequence_logprobs, token_entropy)
from .report import (best_beta, best_beta_table, gold_at_matched_kl, interpolate, markdown_tables,
                     offline_reg_kl_agreement, plot_offline_reg_vs_kl, plot_reward_vs_kl, plot_vs_beta, spearman,
                     write_outputs)
from .run import calibration_refusal, grid, prepare, preference_pairs, run_point, run_study, train_policy
from .task import (EOS, FIRST_WORD, GOOD_EVERY, PAD, SEP, TARGET_LENGTH, body, build_model, build_tokenizer,
                   gold_reward, make_corpus, pretrain, random_prompts, to_text)
