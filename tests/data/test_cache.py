"""The tokenised cache: a second set-up reads it back, with its skipped-row counts; a changed option misses it."""

from __future__ import annotations

from qlit.data import IndicVaultDataModule

GPT2 = "qlit-tiny/gpt2"


def test_a_second_setup_reads_the_tokenised_cache(qlit_cache):
    options = dict(tokenizer=GPT2, path="qlit-samples/indicvault_hinglish", limit_train_samples=50)
    first = IndicVaultDataModule(**options)
    first.setup("fit")
    assert first.cache_hits == 0
    assert len(list((qlit_cache / "tokenized").iterdir())) == 2
    second = IndicVaultDataModule(**options)
    second.setup("fit")
    assert second.cache_hits == 2
    for split in ("train", "validation"):
        assert second.datasets[split]["input_ids"] == first.datasets[split]["input_ids"]
        assert second.datasets[split]["labels"] == first.datasets[split]["labels"]
    # The skipped-row counts come back with the cache, so they are reported on every run.
    assert second.skipped == first.skipped and sum(s["policy"] for s in second.skipped.values()) > 0
    # Anything that changes the tokens is part of the key: a new option tokenises again.
    third = IndicVaultDataModule(**options, system_prompt="Hinglish mein jawab do.")
    third.setup("fit")
    assert third.cache_hits == 0
    assert len(list((qlit_cache / "tokenized").iterdir())) == 4
