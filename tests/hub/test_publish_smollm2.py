"""Publishing a LoRA checkpoint of the embedded SmolLM2 (dry run): the card names the Hub repo the embedded
weights come from and its license, the uploaded adapter config points plain transformers there, and
`kvtrain_training.json` keeps the embedded name, which kvtrain rebuilds exactly."""

from __future__ import annotations

import json

import pytest

from kvtrain.config import KVCompressionConfig
from kvtrain.hub.publish import Request, publish
from tests.hub.test_publish import front_matter


@pytest.fixture(scope="module")
def smollm2_lora(tmp_path_factory):
    """An (untrained, B = 0 except one seeded entry) LoRA on the embedded SmolLM2, saved as training saves it."""
    import torch
    from peft import LoraConfig, get_peft_model

    from kvtrain.models import load_model, model_fingerprint
    from kvtrain.training.output import write_artifacts

    folder = tmp_path_factory.mktemp("smollm2-lora")
    base, tokenizer = load_model("smollm2-135m")
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n)[0, 0] = 0.01
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    metadata = {"format": "adapter", "base_model": "smollm2-135m", "model_fingerprint": model_fingerprint(base.config)}
    config = KVCompressionConfig.from_dict({"budget": 32, "sinks": 4, "recent": 8, "scorer": {"name": "snapkv"}})
    write_artifacts(folder, config, metadata)
    return folder


@pytest.mark.slow
def test_a_smollm2_adapter_card_names_the_origin_of_the_embedded_base(smollm2_lora, capsys):
    plan = publish(Request(checkpoint=smollm2_lora, repo_id="ORG/smollm2-kv", prompt_tokens=128, new_tokens=4),
                   dry_run=True)
    metadata = front_matter(plan.card)
    assert metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and metadata["license"] == "apache-2.0"
    assert metadata["base_model_relation"] == "adapter"
    adapter = json.loads(plan.files["adapter_config.json"])
    assert adapter["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "kvtrain_training.json" not in plan.notes  # the embedded name stays: kvtrain rebuilds that exact base
    assert "trained on kvtrain's embedded `smollm2-135m`" in plan.card
    assert 'm.generate_text("Explain Python decorators.", chat=True)' in plan.card  # SmolLM2 has a chat template
    assert plan.checked.measure.nbytes < plan.checked.measure.seen * plan.checked.measure.full_bytes_per_token
