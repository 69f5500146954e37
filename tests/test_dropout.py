"""LoRA dropout survives DPO: TRL's DPOTrainer zeroes every dropout of the model it trains, and the same model
goes on to the next topic's SFT."""

from mindprint_ray.backends.ray_torch.topic_loop import dropout_rates, restore_dropout


def test_dpo_leaves_the_next_topics_lora_dropout_as_the_spec_says(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import disable_dropout_in_model

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj"]),
    )
    rates = dropout_rates(model)
    lora = {n: p for n, p in rates.items() if "lora_dropout" in n}
    assert lora and set(lora.values()) == {0.1}
    disable_dropout_in_model(model)  # what DPOTrainer does when it starts
    assert set(dropout_rates(model).values()) == {0.0}
    restore_dropout(model, rates)
    assert dropout_rates(model) == rates
