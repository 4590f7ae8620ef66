"""rotary.hf.install into the language model of vision-language models (M-RoPE: Qwen2-VL, Qwen2.5-VL, Qwen3-VL;
Gemma 3 multimodal), with text and with image inputs, against the stock model of the real transformers package:
identity at install, P acts, fold keeps the logits, and a stock from_pretrained of the saved folder computes them.
"""

import copy

import pytest
import torch

import rotary
import rotary.hf

transformers = pytest.importorskip("transformers")

IMAGE, VIDEO, START, VOCAB = 150, 151, 152, 160
_TEXT = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
             vocab_size=VOCAB)


def qwen(model_type: str):
    sections = {"qwen3_vl": [2, 3, 3]}.get(model_type, [2, 3, 3])
    text = dict(_TEXT, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                     "mrope_section": sections})
    if model_type == "qwen3_vl":
        text["rope_parameters"]["mrope_interleaved"] = True
    vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, intermediate_size=64,
                  out_hidden_size=64, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  fullatt_block_indexes=[0], deepstack_visual_indexes=[], num_position_embeddings=64)
    if model_type == "qwen2_vl":
        vision["hidden_size"] = 64  # Qwen2-VL's merger maps to vision hidden_size
    config = transformers.AutoConfig.for_model(model_type, text_config=text, vision_config=vision,
                                               image_token_id=IMAGE, video_token_id=VIDEO,
                                               vision_start_token_id=START)
    torch.manual_seed(0)
    return transformers.AutoModelForImageTextToText.from_config(config).eval()


def inputs(image: bool, seed=0):
    ids = torch.randint(3, 140, (1, 20), generator=torch.Generator().manual_seed(seed))
    if not image:
        return {"input_ids": ids}
    ids[0, 2], ids[0, 3:7] = START, IMAGE  # one image: 4 x 4 patches of 14, merged 2 x 2: 4 tokens
    pixels = torch.randn(16, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(seed + 1))
    return {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": torch.tensor([[1, 4, 4]]),
            "mm_token_type_ids": (ids == IMAGE).long()}


def logits(model, kwargs):
    with torch.no_grad():
        return model(**kwargs).logits


def perturb(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in rotary.hf.installed(model).rotaries:
            for t in p.rotary.parameters():
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    return model


def install_train_fold_reload(stock_model, kwargs, folder, **options):
    """Install (the stock logits), move P away from the identity (the logits move), fold, save: a stock
    from_pretrained of the folder computes the trained logits, with no missing or unexpected key."""
    stock = logits(stock_model, kwargs)
    model = rotary.hf.install(copy.deepcopy(stock_model), **options)
    torch.testing.assert_close(logits(model, kwargs), stock, atol=1e-5, rtol=0)
    trained = logits(perturb(model), kwargs)
    assert (trained - stock).abs().max() > 1e-4
    rotary.fold(model)
    model.save_pretrained(folder)
    loaded, info = transformers.AutoModelForImageTextToText.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(logits(loaded.eval(), kwargs), trained, atol=1e-5, rtol=0)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def vlm(request):
    return qwen(request.param)


@pytest.mark.parametrize("image", [False, True], ids=["text", "image"])
def test_p_in_the_language_model_folds_to_a_stock_checkpoint(vlm, image, tmp_path):
    kwargs = inputs(image)
    stock = logits(vlm, kwargs)
    model = rotary.hf.install(copy.deepcopy(vlm))
    assert rotary.hf.installed(model) is not None and model.model.language_model.rotary.mixer is not None
    torch.testing.assert_close(logits(model, kwargs), stock, atol=1e-5, rtol=0)
    perturb(model)
    trained = logits(model, kwargs)
    assert (trained - stock).abs().max() > 1e-4
    rotary.fold(model)
    torch.testing.assert_close(logits(model, kwargs), trained, atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path)
    loaded, info = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(logits(loaded.eval(), kwargs), trained, atol=1e-5, rtol=0)


def test_m_rope_angles_cannot_be_learned_and_the_refusal_changes_nothing(vlm):
    """M-RoPE's angles come from three position axes by sections; a learned 1-D frequency scale has no stock
    config to go to: refused before anything changes."""
    kwargs = inputs(True)
    stock = logits(vlm, kwargs)
    model = copy.deepcopy(vlm)
    with pytest.raises(ValueError, match="M-RoPE|mrope"):
        rotary.hf.install(model, learned_freq=True)
    assert rotary.hf.installed(model) is None
    assert torch.equal(logits(model, kwargs), stock)


def gemma3():
    text = dict(_TEXT, head_dim=16, layer_types=["sliding_attention", "full_attention"], sliding_window=8)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=IMAGE, boi_token_index=START, eoi_token_index=VIDEO)
    torch.manual_seed(0)
    return transformers.AutoModelForImageTextToText.from_config(config).eval()


@pytest.mark.parametrize("options", [{}, {"learned_freq": True}], ids=["P", "P+freq"])
def test_gemma3_multimodal_with_an_image(options, tmp_path):
    """Gemma 3's decoder at model.model.language_model, per-layer-type angles (local and global), an image."""
    stock_model = gemma3()
    ids = torch.randint(3, 140, (1, 12), generator=torch.Generator().manual_seed(0))
    ids[0, 2], ids[0, 3:7], ids[0, 7] = START, IMAGE, VIDEO
    kwargs = {"input_ids": ids, "pixel_values": torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(1)),
              "token_type_ids": (ids == IMAGE).long()}
    install_train_fold_reload(stock_model, kwargs, tmp_path, **options)


_GLM_TEXT = dict(_TEXT, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                     "mrope_section": [1, 1, 2], "partial_rotary_factor": 0.5})
_GLM_VISION = dict(depth=1, hidden_size=32, num_heads=2, out_hidden_size=64, intermediate_size=64)
OTHER_VLMS = {  # the language model's layout and RoPE come from a text model rotary.hf already knows
    "glm4v": dict(text_config=_GLM_TEXT, vision_config=_GLM_VISION),
    "glm4v_moe": dict(text_config=dict(_GLM_TEXT, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                       first_k_dense_replace=1, n_group=1, topk_group=1), vision_config=_GLM_VISION),
    "mistral3": dict(text_config=dict(_TEXT, head_dim=16, model_type="mistral"),  # Pixtral's vision tower
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, head_dim=16, image_size=28, patch_size=14)),
    "internvl": dict(text_config=dict(_TEXT, head_dim=16, model_type="qwen2"),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=[28, 28], patch_size=[14, 14])),
}


@pytest.mark.parametrize("model_type", list(OTHER_VLMS))
def test_other_vision_language_models_with_text(model_type, tmp_path):
    """GLM-4V and GLM-4V-MoE (M-RoPE on half of each head), Mistral 3 (Pixtral), InternVL: P in the language
    model acts and folds to a checkpoint that a stock from_pretrained reloads; text inputs only."""
    config = transformers.AutoConfig.for_model(model_type, **OTHER_VLMS[model_type])
    torch.manual_seed(0)
    stock_model = transformers.AutoModelForImageTextToText.from_config(config).eval()
    kwargs = inputs(False)
    install_train_fold_reload(stock_model, kwargs, tmp_path)
