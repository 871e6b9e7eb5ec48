"""The trainer logs (not prints) its trainable-parameter count, as peft and transformers count them."""

import logging

from colintern.training.trainer import _log_trainable, build_model
from tests.training.test_trainer import small_run


def test_trainable_parameters_are_logged_as_peft_counts_them(colintern_home, small_synthdocs_dir, tmp_path, caplog,
                                                            capsys):
    from colintern.model.loading import load_model

    lora_model, _ = build_model(small_run(tmp_path, small_synthdocs_dir))
    full_model = load_model("embedded:tiny-internvl3_5", device="cpu")
    full_model.requires_grad_(False)
    full_model.custom_text_proj.requires_grad_(True)  # a plain (non-peft) model with only its head trainable
    with caplog.at_level(logging.INFO, logger="colintern.training.trainer"):
        _log_trainable(lora_model)
        _log_trainable(full_model)
    trainable, total = lora_model.get_nb_trainable_parameters()
    head = sum(p.numel() for p in full_model.custom_text_proj.parameters())
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Trainable parameters")]
    assert messages[0].startswith(f"Trainable parameters: {trainable:,} of {total:,}")
    assert messages[1].startswith(f"Trainable parameters: {head:,} of {full_model.num_parameters():,}")
    assert capsys.readouterr().out == ""  # logged, not printed
