"""A reward a random tiny model earns unevenly, so GRPO's advantages, losses and gradients are not zero in tests."""

from __future__ import annotations

from kvtrain.training.grpo.rewards import completion_text, register_reward


@register_reward("letter_e")
def letter_e():
    """Fraction of a completion's words that contain an 'e'."""

    def reward(completions, **_):
        scores = []
        for completion in completions:
            words = completion_text(completion).split()
            scores.append(sum("e" in w for w in words) / len(words) if words else 0.0)
        return scores

    return reward
