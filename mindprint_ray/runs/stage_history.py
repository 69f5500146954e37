"""The logged steps of one training stage (SFT or DPO) and the summary both backends write for it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StageHistory:
    """Every logged step, and (key, value, step) when the NaN/inf guard stopped the stage."""

    history: list[dict] = field(default_factory=list)
    bad: tuple[str, float, int] | None = None

    def first(self, key: str):
        return next((h[key] for h in self.history if key in h), None)

    def last(self, key: str):
        return next((h[key] for h in reversed(self.history) if key in h), None)

    def mean_of_last_half(self, key: str):
        values = [h[key] for h in self.history if key in h]
        tail = values[len(values) // 2 :]
        return sum(tail) / len(tail) if tail else None

    def summary(self, stage: str) -> dict:
        """summary.json's `topics.<topic>.<stage>`: steps, tokens, peak memory, tokens/s, losses, DPO rewards."""
        rates = [h["tokens_per_s"] for h in self.history if "tokens_per_s" in h]
        out = {
            "steps": self.last("step") or 0,
            "tokens": self.last("num_tokens") or 0,
            "peak_memory_gb": max((h.get("peak_memory_gb", 0) for h in self.history), default=0),
            "tokens_per_s": sum(rates) / len(rates) if rates else None,
            "first_loss": self.first("loss"),
            "last_loss": self.last("loss"),
        }
        if stage == "dpo":
            out.update(
                reward_accuracy=self.mean_of_last_half("rewards/accuracies"),
                reward_margin=self.mean_of_last_half("rewards/margins"),
                first_reward_accuracy=self.first("rewards/accuracies"),
            )
        return out
