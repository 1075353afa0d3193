"""benchmarks/trl.py's end-to-end and generation cases run (tiny model, fresh processes)."""

import pytest

pytest.importorskip("trl")


def test_prompt_text_encodes_to_the_requested_length():
    from benchmarks.trl_e2e import benchmark_tokenizer, prompt_text

    tok = benchmark_tokenizer()
    for n in (1, 8, 9, 64):
        assert len(tok(prompt_text(tok, n), add_special_tokens=False)["input_ids"]) == n


def test_smoke_end_to_end_and_generation_cases():
    from benchmarks import trl

    cases = ["trl_e2e", "prefix_rft_e2e", "gen_trl", "gen_hf_engine"]
    rows = trl.main(["--smoke", "--cases", *cases])
    assert [r["impl"] for r in rows] == cases
    ops = {r["impl"]: r["op"] for r in rows}
    assert ops["trl_e2e"] == ops["prefix_rft_e2e"] == "grpo_step"
    assert ops["gen_trl"] == ops["gen_hf_engine"] == "generate"
    for r in rows:
        extra = dict(kv.split("=", 1) for kv in r["extra"].split(";"))
        assert float(extra["tokens_per_s"]) > 0
