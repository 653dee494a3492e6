"""The GPO paper's toy point, on a bandit: the offline regulariser is not KL.

A tabular softmax policy over K arms, reference uniform. Preference data mu only ever compares arms in a subset S.
The margin of a pair (w, l) is rho = (theta_w - theta_l) - (ref_w - ref_l): it only sees logit *differences inside
S*. So adding the same constant c to every logit in S leaves every rho, and the offline regulariser 1/2 E_mu[rho^2],
unchanged, while it moves probability mass onto S and KL(pi || pi_ref) grows towards log(K / |S|) (all mass on S);
with K = 32 arms and |S| = 3, up to 2.37 nats, at an offline regulariser that never moves.

    python -m gpo_trl.experiments.bandit --out runs/bandit      # writes bandit.png and bandit.json

Part 1 traces that family of policies (c from 0 to 6) starting from a GPO-trained policy. Part 2 trains the policy
with the logistic GPO loss at several beta on the same data and reports both quantities at the end of training.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..losses import get_loss


def make_data(arms: int = 32, covered: int = 3, pairs: int = 2000, seed: int = 0):
    """Pairs among the first `covered` arms, labelled by Bradley-Terry on a true reward r(a) = a-th arm's quality."""
    generator = torch.Generator().manual_seed(seed)
    reward = torch.linspace(1.0, -1.0, arms)  # arm 0 best
    first = torch.randint(covered, (pairs,), generator=generator)
    second = (first + torch.randint(1, covered, (pairs,), generator=generator)) % covered
    first_wins = torch.rand(pairs, generator=generator) < torch.sigmoid(reward[first] - reward[second])
    chosen = torch.where(first_wins, first, second)
    rejected = torch.where(first_wins, second, first)
    return chosen, rejected


def offline_regulariser(logits: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """1/2 E_mu[rho^2] with a uniform reference (its logits cancel in rho)."""
    rho = logits[chosen] - logits[rejected]
    return 0.5 * (rho**2).mean().item()


def kl_to_uniform(logits: torch.Tensor) -> float:
    log_pi = torch.log_softmax(logits, dim=0)
    return (log_pi.exp() * (log_pi + torch.log(torch.tensor(float(len(logits)))))).sum().item()


def train(chosen, rejected, arms: int, beta: float, loss: str = "logistic", steps: int = 500, lr: float = 0.1):
    """Full-batch Adam on E_mu f(beta * rho), from the reference (all logits 0)."""
    f = get_loss(loss)
    logits = torch.zeros(arms, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        f(beta * (logits[chosen] - logits[rejected])).mean().backward()
        optimizer.step()
    return logits.detach()


def run(arms: int = 32, covered: int = 3, seed: int = 0, betas=(0.1, 0.3, 1.0, 3.0)) -> dict:
    chosen, rejected = make_data(arms, covered, seed=seed)
    trained = {beta: train(chosen, rejected, arms, beta) for beta in betas}
    start = trained[betas[-1]]
    shifts = [i * 0.5 for i in range(13)]
    family = []
    for c in shifts:
        logits = start.clone()
        logits[:covered] += c  # the same constant on every covered arm: every rho unchanged
        family.append({"shift": c, "offline_reg": offline_regulariser(logits, chosen, rejected),
                       "kl": kl_to_uniform(logits)})
    points = [{"beta": beta, "offline_reg": offline_regulariser(l, chosen, rejected), "kl": kl_to_uniform(l)}
              for beta, l in trained.items()]
    return {"arms": arms, "covered": covered, "family": family, "trained": points}


def plot(result: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    shifts = [p["shift"] for p in result["family"]]
    left.plot(shifts, [p["offline_reg"] for p in result["family"]], marker="o", label="offline reg. 1/2 E_mu[rho^2]")
    left.plot(shifts, [p["kl"] for p in result["family"]], marker="s", label="KL(pi || pi_ref)")
    left.set_xlabel(f"constant added to the logits of the {result['covered']} arms mu covers")
    left.set_title("Same margins on the data, growing KL")
    left.legend()
    for point in result["trained"]:
        xy = (max(point["offline_reg"], 1e-8), max(point["kl"], 1e-8))  # log axes
        right.scatter(*xy)
        right.annotate(f"beta={point['beta']}", xy)
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("offline regulariser 1/2 E_mu[rho^2]")
    right.set_ylabel("KL(pi || pi_ref)")
    right.set_title("GPO (logistic) trained at several beta")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bandit")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(seed=args.seed)
    (out / "bandit.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "bandit.png")
    for point in result["family"][:: len(result["family"]) // 4]:
        print(f"shift {point['shift']:.1f}: offline reg {point['offline_reg']:.4f}, KL {point['kl']:.4f}")
    for point in result["trained"]:
        print(f"trained beta {point['beta']}: offline reg {point['offline_reg']:.4f}, KL {point['kl']:.4f}")
    return result


if __name__ == "__main__":
    main()
