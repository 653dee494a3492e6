"""Plot labels for people: a metric key in words, its unit, and what to look for.

`describe("eval_gpo/margin")` -> Label(words="held-out mean log-ratio margin E[ρ]", unit="nats", ...). Sweep plots
put the words and unit on the axis, the raw key under it in small print (it is the column of results.csv), and a
caption line saying what to look for. An unknown key is its own label, without unit or caption.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Label:
    words: str
    unit: str = ""
    look_for: str = ""  # one sentence for a caption, when this is the plot's y

    def axis_text(self) -> str:
        return f"{self.words} ({self.unit})" if self.unit else self.words


# Keys as the trainer logs them (without the eval_/before_ prefixes). rho = the chosen-minus-rejected log-ratio
# margin of a pair, log pi/pi_ref summed over the completion's tokens, so in nats.
_METRICS = {
    "beta": Label("β, regularisation strength", "", ""),
    "gpo/beta_effective": Label("effective β the loss runs at", ""),
    "gpo/margin": Label("mean log-ratio margin E[ρ]", "nats",
                        "How far the policy has moved from the reference on these pairs: larger = further; a "
                        "larger beta should keep it smaller."),
    "gpo/offline_reg": Label("offline regulariser ½E[ρ²]", "nats²",
                             "The term that keeps the policy near the reference: smaller = closer; a larger beta "
                             "should make it smaller."),
    "gpo/push": Label("share still pushing E|f'(βρ)|", "",
                      "How much of the data still moves the policy: near 0 = the loss has saturated."),
    "gpo/sft_loss": Label("SFT loss of chosen answers", "nats per token"),
    "rewards/accuracies": Label("reward accuracy, ties count as wrong", "share of pairs",
                                "Share of pairs the policy ranks right: above 0.5 (chance) = it learned the "
                                "preference."),
    "rewards/margins": Label("reward margin βρ", "nats",
                             "The implicit reward gap between chosen and rejected: larger = stronger preference."),
    "rewards/chosen": Label("implicit reward, chosen", "nats"),
    "rewards/rejected": Label("implicit reward, rejected", "nats"),
    "logps/chosen": Label("log-likelihood of chosen answers", "nats per answer",
                          "A large drop means the policy moves away from the data itself (over-optimisation), "
                          "even while the margin grows."),
    "logps/rejected": Label("log-likelihood of rejected answers", "nats per answer"),
    "loss": Label("GPO loss E[f(βρ)]", ""),
    "train_runtime": Label("training time", "s"),
    "gen/kl": Label("KL(policy ‖ reference) of samples", "nats per sample",
                    "Further right = further from the reference; the best runs reach a high score at a small KL."),
    "gen/judge_mean": Label("mean judge score of samples", "judge units",
                            "Higher is better by the judge; compare runs at the same KL."),
    "gen/win_rate": Label("win rate against the base model", "share of samples",
                          "Above 0.5 = the judge prefers the policy to the base."),
}
_PREFIXES = {"eval_": "held-out ", "before_eval_": "held-out, before training: ", "before_": "before training: "}


def describe(key: str) -> Label:
    """The label of a results.csv column (a metric or a grid key)."""
    prefix = next((p for p in sorted(_PREFIXES, key=len, reverse=True) if key.startswith(p)), "")
    label = _METRICS.get(key[len(prefix):])
    if label is None:
        return Label(key)
    return Label(_PREFIXES.get(prefix, "") + label.words, label.unit, label.look_for)


def caption(x: str, y: str, colour_key: str | None) -> str:
    """One line under a plot: what each point is, and what to look for in y."""
    each = "Each point is one run" + (f", coloured by {colour_key}" if colour_key else "") + "."
    return f"{each} {describe(y).look_for}".strip()
