"""tiny-random Qwen3-VL: determinism, save/reload, 4-bit on CPU, adapters, batching, offline
errors."""
import math

import pytest
import torch

import common
import rationalrewards as rr
from conftest import solid


@pytest.fixture(scope="module")
def tiny():
    return common.load_vlm("tiny-random")


def greedy(backend, msgs, n=12):
    return [g.text for g in backend.generate(msgs, max_new_tokens=n, temperature=0.0,
                                             min_new_tokens=n)]


def test_tiny_random_is_deterministic_per_seed():
    m0, _ = common.build_tiny("qwen3vl", 0)
    m0b, _ = common.build_tiny("qwen3vl", 0)
    m1, _ = common.build_tiny("qwen3vl", 1)
    w = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(m0.state_dict()[w], m0b.state_dict()[w])
    assert not torch.equal(m0.state_dict()[w], m1.state_dict()[w])
    hidden = [m0.config.text_config.hidden_size, m0.config.text_config.intermediate_size,
              m0.config.vision_config.hidden_size, m0.config.vision_config.intermediate_size]
    assert all(h % 64 == 0 for h in hidden)


def test_tiny_saves_and_reloads_through_from_pretrained(tmp_path):
    model, processor = common.build_tiny("qwen3vl", 0)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    processor.tokenizer.padding_side = "left"
    reloaded, rproc = common.load_vlm(str(tmp_path))
    assert type(reloaded).__name__ == "Qwen3VLForConditionalGeneration"
    msgs = [rr.render_messages("pointwise_t2i", [solid("red")], request="a red cat")]
    a = greedy(common.TransformersBackend(model.eval(), processor), msgs)
    b = greedy(common.TransformersBackend(reloaded, rproc), msgs)
    assert a == b
    # and the reloaded model scores through the scorer
    backend = common.TransformersBackend(reloaded, rproc)
    scorer = rr.RationalRewardsScorer(backend, max_new_tokens=16,
                                      temperature=0.0)
    [c] = scorer.critique([solid("red")], ["a red cat"])
    assert scorer.rewards([solid("red")], ["a red cat"]) == [rr.reward_from_scores(c.scores)]


def test_chat_template_expands_image_tokens(tiny):
    model, processor = tiny
    msgs = [rr.render_messages("pairwise_t2i", [solid("red"), solid("blue")], request="x")]
    inputs = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(model.config.vision_start_token_id) == 2
    patches = int(inputs["image_grid_thw"].prod(-1).sum())
    assert ids.count(model.config.image_token_id) == patches // 4
    assert processor.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_batched_generation_matches_one_by_one(tiny):
    """Left padding is right: greedy outputs do not depend on the batch."""
    model, processor = tiny
    reqs = [
        "a cat", "a very long request about a red bicycle leaning on a brick wall at sunset", "dog"
    ]
    msgs = [rr.render_messages("pointwise_t2i", [solid(c, s)], request=r)
            for c, s, r in zip(("red", "blue", "green"), ((64, 64), (96, 48), (40, 80)), reqs)]
    batched = greedy(common.TransformersBackend(model, processor, batch_size=3), msgs)
    single = greedy(common.TransformersBackend(model, processor, batch_size=1), msgs)
    assert batched == single and len(batched) == 3


def test_answer_logprobs_are_the_models_over_the_vocabulary_and_batch_invariant(tiny):
    model, processor = tiny
    msgs = [rr.render_messages("consistency_t2i", [solid("red"), solid("blue")], request=r,
                               rationale="A is better.")
            for r in ("x", "a longer request here")]
    backend = common.TransformersBackend(model, processor, batch_size=1)
    batched = common.TransformersBackend(model, processor, batch_size=2).answer_logprobs(msgs)
    single = backend.answer_logprobs(msgs)
    for m, lb, ls in zip(msgs, batched, single):
        # a log-softmax over the whole vocabulary, not over {A, B}: the two hold less than all mass
        assert math.exp(lb["A"]) + math.exp(lb["B"]) < 1.0
        with torch.no_grad():
            logits = model(**backend._inputs([m])).logits[0, -1].float()  # (V,)
        for a in ("A", "B"):
            token = processor.tokenizer.encode(a, add_special_tokens=False)[0]
            assert ls[a] == pytest.approx(float(torch.log_softmax(logits, -1)[token]), abs=1e-4)
            assert lb[a] == pytest.approx(ls[a], abs=1e-4)


def test_right_padded_processor_still_gives_batch_invariant_logprobs():
    # issue 7.6: a processor loaded elsewhere with right padding; the backend must pad left itself
    model, processor = common.load_vlm("tiny-random")
    msgs = [rr.render_messages("consistency_t2i", [solid("red"), solid("blue")], request=r,
                               rationale="A is better.")
            for r in ("x", "a much longer request with many more words in it")]
    single = [
        common.TransformersBackend(model, processor, batch_size=1).answer_logprobs([m])[0]
        for m in msgs
    ]
    processor.tokenizer.padding_side = "right"
    batched = common.TransformersBackend(model, processor, batch_size=2).answer_logprobs(msgs)
    for lb, ls in zip(batched, single):
        assert lb["A"] == pytest.approx(ls["A"], abs=1e-4)
        assert lb["B"] == pytest.approx(ls["B"], abs=1e-4)


def test_4bit_loads_and_generates_on_cpu():
    import bitsandbytes as bnb
    model, processor = common.load_vlm("tiny-random", quantization="4bit", device="cpu")
    assert isinstance(model.model.language_model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert isinstance(model.model.language_model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    assert type(model.model.visual.blocks[0].attn.qkv) is torch.nn.Linear  # vision tower left alone
    assert type(model.lm_head) is torch.nn.Linear
    out = greedy(common.TransformersBackend(model, processor),
                 [rr.render_messages("pointwise_t2i", [solid("red")], request="x")] * 2, n=8)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)


def test_8bit_loads_and_generates_on_cpu():
    import bitsandbytes as bnb
    model, processor = common.load_vlm("tiny-random", quantization="8bit", device="cpu")
    assert isinstance(model.model.language_model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
    assert type(model.model.visual.blocks[0].attn.qkv) is torch.nn.Linear
    out = greedy(common.TransformersBackend(model, processor),
                 [rr.render_messages("pointwise_t2i", [solid("red")], request="x")], n=4)
    assert len(out) == 1


def test_adapter_is_applied_and_bad_adapter_is_clear(tmp_path, tiny):
    from peft import LoraConfig, PeftModel, get_peft_model
    base, _ = common.build_tiny("qwen3vl", 0)
    config = LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                        init_lora_weights=False)
    peft = get_peft_model(base, config)
    peft.save_pretrained(tmp_path / "adapter")
    model, _ = common.load_vlm("tiny-random", adapter=str(tmp_path / "adapter"))
    assert isinstance(model, PeftModel)
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.ModelLoadError, match="adapter_config.json"):
        common.load_vlm("tiny-random", adapter=str(tmp_path / "empty"))


def test_offline_hub_id_is_a_clear_error():
    with pytest.raises(common.ModelLoadError) as err:
        common.load_vlm("no-such-org/no-such-model")
    msg = str(err.value)
    assert "no-such-org/no-such-model" in msg and "hf download" in msg and "tiny-random" in msg


def test_edit_scorer_needs_source_images(tiny):
    backend = common.TransformersBackend(*tiny)
    scorer = rr.RationalRewardsScorer(backend, task="edit", max_new_tokens=4)
    with pytest.raises(ValueError, match="source image"):
        scorer.critique([solid("red")], ["x"])
    [c] = scorer.critique([solid("red")], ["x"], [solid("blue")])
    assert set(c.scores) == set(rr.EDIT_DIMENSIONS)


def test_the_tiny_generators_colour_follows_the_latent():
    """A unit shift of one latent channel, in the units the transformer works in, moves that
    colour channel of every pixel by 0.15 x 3 tanh(.) of the decoded shift (about 24 of 255 for
    SD3's scaling 1.5305 around zero), and no other channel."""
    pipe = common.load_generator("tiny-random")
    vae = pipe.vae
    decode = lambda x: vae.decode(x / vae.config.scaling_factor + vae.config.shift_factor).sample
    with torch.no_grad():
        x = torch.zeros(1, 4, 8, 8)
        base = (decode(x) + 1) / 2 * 255                                 # (1, 3, 16, 16)
        x[:, 0] = 1.0
        moved = (decode(x) + 1) / 2 * 255
    z0, z1 = vae.config.shift_factor, 1 / vae.config.scaling_factor + vae.config.shift_factor
    expected = 0.15 * 3 * (math.tanh(z1 / 3) - math.tanh(z0 / 3)) * 255
    diff = (moved - base).mean(dim=(0, 2, 3))
    assert diff[0].item() == pytest.approx(expected, rel=1e-4) and 23 < expected < 25
    assert diff[1:].abs().max().item() < 1e-4


def test_a_saved_generator_folder_needs_no_extra_flags(tmp_path):
    """A pipeline saved without T5 (as tiny-random is) loads as it is; RL trains at 512 px, the
    sources' size, unless --resolution says otherwise (tiny-random: 64)."""
    import rl_nft
    common.load_generator("tiny-random").save_pretrained(tmp_path / "gen")
    pipe = common.load_generator(str(tmp_path / "gen"))
    assert pipe.text_encoder_3 is None
    assert rl_nft.resolve_defaults(rl_nft.Args(generator="tiny-random")).resolution == 64
    assert rl_nft.resolve_defaults(rl_nft.Args()).resolution == 512  # SD3.5-Medium: the sources'
