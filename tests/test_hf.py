"""rotary.hf on causal LMs of the real transformers package: tiny models built from configs, no downloads.

Every check compares against stock transformers: the identity install must compute what stock computes, and a
random P must compute what a stock model computes whose q_proj/k_proj rows this file multiplies by P per head,
in float64, independently of rotary.fold.
"""

import copy
import dataclasses

import pytest
import torch

import rotary

transformers = pytest.importorskip("transformers")

KINDS = ["llama", "qwen2", "qwen3", "mistral", "gemma"]
_CONFIGS = {
    "llama": transformers.LlamaConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
    "mistral": transformers.MistralConfig,
    "gemma": transformers.GemmaConfig,
    "olmo2": transformers.Olmo2Config,  # q/k norms over all heads at once, before the heads are split
    "stablelm": transformers.StableLmConfig,  # partial rotary: RoPE on half of each head, built below
}
VOCAB = 97


def tiny(kind="llama", attn="eager", **overrides):
    """A 2-layer, width-64 causal LM with grouped-query attention (4 heads, 2 key/value heads of 16), eval mode.

    Initialised at std 0.1 (logits of order one), with random q/k biases where the model has them.
    """
    options = dict(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=256, initializer_range=0.1,
        attn_implementation=attn, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    if kind == "stablelm":
        options["partial_rotary_factor"] = 0.5
    options.update(overrides)
    model = transformers.AutoModelForCausalLM.from_config(_CONFIGS[kind](**options)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                if proj.bias is not None:
                    proj.bias.normal_(std=0.5)
    return model


def randomize(model):
    """Every installed P (and learned frequency scale) away from the identity."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".rotary." in name or name.startswith("rotary."):
                p.normal_(std=0.5)
    return model


def mixed_by_hand(stock, installed):
    """A copy of ``stock`` with q_proj/k_proj rows (and biases) multiplied by each layer's P per head, in float64."""
    model = copy.deepcopy(stock)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            attn = installed.model.layers[i].self_attn
            r = getattr(attn, "rotary", None) or installed.model.rotary
            P = r.mixing_matrix(torch.float64)  # (D, D)
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                w = proj.weight.double().view(-1, 16, proj.in_features)  # (H, D, C)
                proj.weight.copy_(torch.einsum("ij,hjc->hic", P, w).reshape(proj.weight.shape))
                if proj.bias is not None:
                    proj.bias.copy_(torch.einsum("ij,hj->hi", P, proj.bias.double().view(-1, 16)).flatten())
    return model


def tokens(batch=2, length=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def max_diff(a, b):
    return (a - b).abs().max().item()


def train_steps(model, steps=3, lr=0.05):
    """A few SGD steps on random tokens; returns the model in eval mode."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(steps):
        ids = tokens(seed=100 + step)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


# --------------------------------------------------------------------------------------------- identity, P
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", KINDS)
def test_identity_install_equals_stock(kind, attn):
    stock = tiny(kind, attn)
    model = rotary.hf.install(copy.deepcopy(stock))
    ids = tokens()
    assert max_diff(logits(model, ids), logits(stock, ids)) <= 1e-6
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **greedy), stock.generate(ids, **greedy))


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("kind", [*KINDS, "olmo2", "stablelm"])
def test_random_p_equals_weights_multiplied_by_hand(kind, per_layer):
    stock = tiny(kind)
    model = randomize(rotary.hf.install(copy.deepcopy(stock), per_layer=per_layer))
    if per_layer:
        assert "rotary" not in model.model._modules
        Ps = [layer.self_attn.rotary.mixing_matrix() for layer in model.model.layers]
        assert not torch.equal(Ps[0], Ps[1])
    ids = tokens()
    reference = logits(mixed_by_hand(stock, model), ids)
    assert max_diff(logits(model, ids), reference) <= 1e-5
    assert max_diff(logits(model, ids), logits(stock, ids)) > 1e-3  # P matters


def test_orthogonal_mixing_and_one_p_for_every_layer():
    stock = tiny()
    model = randomize(rotary.hf.install(copy.deepcopy(stock), mixing="orthogonal"))
    names = [n for n, _ in model.named_parameters() if "rotary" in n]
    assert names and all(n.startswith("model.rotary.mixer.") for n in names)
    ids = tokens()
    assert max_diff(logits(model, ids), logits(mixed_by_hand(stock, model), ids)) <= 1e-5


def test_deepcopy_of_an_installed_model_is_independent():
    model = randomize(rotary.hf.install(tiny()))
    twin = copy.deepcopy(model)
    ids = tokens()
    before = logits(model, ids)
    assert torch.equal(logits(twin, ids), before)
    randomize(twin)
    assert torch.equal(logits(model, ids), before) and max_diff(logits(twin, ids), before) > 1e-3


def test_bfloat16_identity_is_bit_exact():
    stock = tiny().to(torch.bfloat16)
    model = rotary.hf.install(copy.deepcopy(stock))
    ids = tokens()
    assert torch.equal(logits(model, ids), logits(stock, ids))


# --------------------------------------------------------------------------------------------- training
def test_training_updates_p_and_gradient_checkpointing_agrees():
    stock = tiny(attn="sdpa")
    models = [randomize(rotary.hf.install(copy.deepcopy(stock))) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    models[1].activation_checkpointing_enable()
    ids = tokens()
    grads = []
    for model in models:
        model.train()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    angles = grads[0]["model.rotary.mixer.angles"]
    assert angles.abs().max() > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["llama", "stablelm"])
def test_learned_frequencies_start_at_the_models_angles_and_train(kind):
    stock = tiny(kind)
    model = rotary.hf.install(copy.deepcopy(stock), learned_freq=True)
    assert model.model.rotary.rotary_dim == (8 if kind == "stablelm" else 16)  # partial rotary kept
    ids = tokens()
    # transformers forms the angles in float32, rotary in float64: a few float32 ulps apart at these positions
    assert max_diff(logits(model, ids), logits(stock, ids)) <= 1e-5
    model.train()
    model(ids, labels=ids).loss.backward()
    assert model.model.rotary.angles.log_freq_scale.grad.abs().max() > 0
    assert model.model.rotary.mixer.angles.grad.abs().max() > 0


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0},
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
    ],
)
def test_scaling_equals_transformers_with_those_rope_parameters(scaling):
    stock = tiny()
    model = rotary.hf.install(copy.deepcopy(stock), scaling=scaling)
    scaled = tiny(rope_parameters=dict(scaling))
    scaled.load_state_dict(stock.state_dict())
    ids = tokens(length=40)
    assert max_diff(logits(model, ids), logits(scaled, ids)) <= 1e-5
    assert max_diff(logits(model, ids), logits(stock, ids)) > 1e-4


def test_learned_frequencies_on_a_model_with_yarn_start_at_its_angles():
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    stock = tiny(rope_parameters=scaling)
    model = rotary.hf.install(copy.deepcopy(stock), learned_freq=True)
    ids = tokens(length=40)
    assert max_diff(logits(model, ids), logits(stock, ids)) <= 1e-5


# --------------------------------------------------------------------------------------------- generate
@pytest.mark.parametrize("options", [{}, {"learned_freq": True}], ids=["givens", "learned_freq"])
def test_generate_matches_the_model_with_weights_multiplied_by_hand(options):
    stock = tiny(attn="sdpa")
    model = randomize(rotary.hf.install(copy.deepcopy(stock), **options))
    ids = tokens(length=7)
    if options:
        # angles changed: no stock reference; the cache must reproduce a full forward, token by token
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
        full = logits(model, out.sequences[:, :-1])
        for t, step in enumerate(out.logits):
            assert max_diff(step, full[:, ids.shape[1] - 1 + t]) <= 1e-5
        return
    reference = mixed_by_hand(stock, model)
    for kwargs in (dict(do_sample=False), dict(num_beams=3, do_sample=False)):
        kwargs.update(max_new_tokens=6, pad_token_id=0)
        assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))
    # left-padded batch of different lengths
    padded = ids.clone()
    padded[0, :3] = 0
    mask = (padded != 0).long()
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(padded, **kwargs), reference.generate(padded, **kwargs))


def test_sampling_equals_stock_at_the_identity():
    stock = tiny(attn="sdpa")
    model = rotary.hf.install(copy.deepcopy(stock))
    ids = tokens(length=5)
    outs = []
    for m in (model, stock):
        torch.manual_seed(7)
        outs.append(m.generate(ids, max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0))
    assert torch.equal(outs[0], outs[1])


# --------------------------------------------------------------------------------------------- compile
@pytest.mark.parametrize(
    "kind, options",
    [("llama", {}), ("llama", {"learned_freq": True}), ("qwen3", {})],
    ids=["givens", "learned", "qwen3"],
)
def test_compile_adds_no_graph_breaks(kind, options, fresh_dynamo):
    stock = tiny(kind, attn="sdpa")
    model = randomize(rotary.hf.install(copy.deepcopy(stock), **options))
    ids = tokens()
    breaks = [torch._dynamo.explain(m)(ids).graph_break_count for m in (stock, model)]
    assert breaks[1] == breaks[0]
    if breaks[0] == 0:
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        with torch.no_grad():
            assert max_diff(compiled(ids).logits, logits(model, ids)) <= 1e-6


# --------------------------------------------------------------------------------------------- fold, ship
@pytest.mark.parametrize(
    "kind, per_layer",
    [("llama", False), ("qwen2", False), ("qwen2", True), ("qwen3", False), ("gemma", True), ("olmo2", False)],
)
def test_fold_then_stock_from_pretrained_gives_the_trained_logits(kind, per_layer, tmp_path):
    stock = tiny(kind)
    model = randomize(rotary.hf.install(copy.deepcopy(stock), per_layer=per_layer))
    if kind in ("qwen3", "olmo2"):  # P folds through q/k norms only while their weight is uniform: freeze them
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.data.fill_(1.5)
                norm.weight.requires_grad_(False)
    model = train_steps(model)
    ids = tokens()
    trained = logits(model, ids)
    rotary.fold(model)
    assert rotary.hf.installed(model) is None
    assert list(model.state_dict()) == list(stock.state_dict())
    assert not any("forward" in m.__dict__ or m._forward_hooks for m in model.modules())
    assert [len(m._load_state_dict_pre_hooks) for m in model.modules()] == [
        len(m._load_state_dict_pre_hooks) for m in stock.modules()
    ]
    model.save_pretrained(tmp_path)
    assert "rotary" not in (tmp_path / "config.json").read_text()
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(loaded) is type(stock)
    assert max_diff(logits(loaded.eval(), ids), trained) <= 1e-5


def test_fold_refuses_a_non_uniform_qk_norm_and_changes_nothing():
    model = randomize(rotary.hf.install(tiny("qwen3"), mix_norm="after"))
    with torch.no_grad():
        model.model.layers[1].self_attn.k_norm.weight[3] = 2.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="k_norm.*not uniform.*Nothing was changed"):
        rotary.fold(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert rotary.hf.installed(model) is not None and model.model.rotary.mixer is not None


def test_fold_with_learned_frequencies_writes_a_stock_config(tmp_path):
    stock = tiny()
    model = train_steps(randomize(rotary.hf.install(copy.deepcopy(stock), learned_freq=True)))
    ids = tokens()
    trained = logits(model, ids)
    rotary.fold(model)
    # the model in memory is stock: no rotary module, forward, hook or record; rotary_emb follows the new config
    assert rotary.hf.installed(model) is None and not {"rotary", "rotary_install"} & set(model.config.to_dict())
    assert list(model.state_dict()) == list(stock.state_dict())
    assert [type(m) for m in model.modules()] == [type(m) for m in stock.modules()]
    assert not any("forward" in m.__dict__ or m._forward_hooks for m in model.modules())
    params = model.config.rope_parameters
    assert params["rope_type"] == "longrope" and params["short_factor"] == params["long_factor"]
    assert params["attention_factor"] == 1.0 and params["original_max_position_embeddings"] == 256
    model.save_pretrained(tmp_path)
    assert "rotary" not in (tmp_path / "config.json").read_text()
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # transformers forms the angles in float32, the trained model in float64
    assert max_diff(logits(loaded.eval(), ids), trained) <= 1e-5
    assert max_diff(logits(model, ids), trained) <= 1e-5


# --------------------------------------------------------------------------------------------- save, reload
@pytest.mark.parametrize("options", [{}, {"per_layer": True}, {"learned_freq": True}], ids=str)
def test_save_and_reload_unfolded_is_bit_identical(options, tmp_path):
    model = train_steps(randomize(rotary.hf.install(tiny("qwen2"), **options)))
    model.save_pretrained(tmp_path)
    reloaded = rotary.hf.from_pretrained(transformers.AutoModelForCausalLM, tmp_path, attn_implementation="eager")
    reloaded.eval()
    assert rotary.hf.installed(reloaded).options == rotary.hf.installed(model).options
    state, again = model.state_dict(), reloaded.state_dict()
    assert list(state) == list(again)
    assert all(torch.equal(state[k], again[k]) for k in state)
    ids = tokens()
    assert torch.equal(logits(reloaded, ids), logits(model, ids))


def test_reload_errors_name_expected_and_found(tmp_path):
    model = rotary.hf.install(tiny())
    model.save_pretrained(tmp_path / "installed")
    with pytest.raises(ValueError, match=r"expected \{.*'per_layer': True.*\}, found \{.*'per_layer': False"):
        rotary.hf.from_pretrained(
            transformers.AutoModelForCausalLM,
            tmp_path / "installed",
            rotary=dataclasses.replace(rotary.hf.installed(model).options, per_layer=True),
        )
    # a stock from_pretrained drops P: installing on top of it is refused, naming the recorded install
    dropped = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "installed")
    with pytest.raises(RuntimeError, match="records a rotary install.*rotary.hf.from_pretrained"):
        rotary.hf.install(dropped)
    # a checkpoint of another install, loaded into an installed model by load_state_dict (as Trainer resumes)
    from safetensors.torch import load_file

    per_layer = rotary.hf.install(tiny(), per_layer=True)
    state = load_file(tmp_path / "installed" / "model.safetensors")
    expected = r"expects rotary tensors \['model.layers.0.self_attn.rotary.mixer.angles'.*found \['model.rotary"
    with pytest.raises(ValueError, match=expected):
        per_layer.load_state_dict(state, strict=False)
    per_layer.load_state_dict(tiny().state_dict(), strict=False)  # stock weights into an installed model: fine
    tiny().save_pretrained(tmp_path / "stock")
    with pytest.raises(ValueError, match="records no rotary install"):
        rotary.hf.from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "stock")


# --------------------------------------------------------------------------------------------- uninstall, errors
@pytest.mark.parametrize("options", [{}, {"per_layer": True, "learned_freq": True}], ids=str)
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_uninstall_restores_the_stock_module_tree(kind, options):
    stock = tiny(kind)
    model = rotary.hf.install(copy.deepcopy(stock), **options)
    assert rotary.hf.installed(model) is not None
    rotary.hf.uninstall(model)
    assert list(model.state_dict()) == list(stock.state_dict())
    assert [type(m) for m in model.modules()] == [type(m) for m in stock.modules()]
    assert not any("forward" in m.__dict__ or m._forward_hooks for m in model.modules())
    hooks = [len(m._load_state_dict_pre_hooks) for m in (model, stock)]
    assert hooks[0] == hooks[1]
    assert rotary.hf.installed(model) is None and not {"rotary", "rotary_install"} & set(model.config.to_dict())
    ids = tokens()
    assert torch.equal(logits(model, ids), logits(stock, ids))
    with pytest.raises(ValueError, match="no rotary is installed"):
        rotary.hf.uninstall(model)


def _snapshot(model):
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        list(model.state_dict()),
        [("forward" in m.__dict__, len(m._forward_hooks), len(m._load_state_dict_pre_hooks)) for m in model.modules()],
        model.config.to_json_string(),
    )


def test_bad_input_is_refused_and_leaves_nothing_behind():
    model = tiny()
    snapshot = _snapshot(model)
    with pytest.raises(TypeError, match=r"\['base'\].*come from the model's config"):
        rotary.hf.install(model, base=500.0)
    with pytest.raises(ValueError, match="rope_type"):
        rotary.hf.install(model, scaling={"rope_type": "nonsense", "factor": 2.0})
    with pytest.raises(ValueError, match="unknown mixing|mixing"):
        rotary.hf.install(model, mixing="nonsense")
    with pytest.raises(ValueError, match="nothing to install"):
        rotary.hf.install(model, mixing=None)
    assert _snapshot(model) == snapshot
    rotary.hf.install(model)
    with pytest.raises(RuntimeError, match="already installed.*uninstall"):
        rotary.hf.install(model, per_layer=True)
    rotary.hf.uninstall(model)
    assert _snapshot(model) == snapshot


def test_models_without_their_own_qk_rope_are_refused():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB))
    with pytest.raises(TypeError, match="layer list and a rotary_emb.*got GPT2LMHeadModel"):
        rotary.hf.install(gpt2)


def test_norm_hook_is_what_acts_in_qwen3_with_p_after_the_norm():
    model = randomize(rotary.hf.install(tiny("qwen3"), mix_norm="after"))
    attn = model.model.layers[0].self_attn
    assert len(attn.q_norm._forward_hooks) == 1 and "forward" not in attn.q_proj.__dict__


def test_speed_benchmark_runs():
    from rotary.lab.bench.hf_speed import measure

    result = measure(layers=1, hidden=32, heads=2, kv_heads=1, vocab=64, batch=1, seq=8, prompt=4, new_tokens=3,
                     repeats=1, warmup=0)
    assert set(result["ratios"]) >= {"train_installed_over_stock", "generate_folded_over_stock"}
    assert all(r > 0 for r in result["ratios"].values())


@pytest.mark.parametrize("bad, named", [
    (dict(per_layer="yes"), "'yes'"), (dict(learned_freq=1), "1"), (dict(mix_on="bias"), "'bias'"),
    (dict(scaling="yarn"), "'yarn'"), (dict(mixing="nonsense"), "'nonsense'"),
])
def test_lax_options_are_refused_and_leave_the_model_unchanged(bad, named):
    model = tiny()
    snapshot, ids = _snapshot(model), tokens()
    before = logits(model, ids)
    with pytest.raises(ValueError, match=rf"got {named}"):
        rotary.hf.install(model, **bad)
    assert _snapshot(model) == snapshot and rotary.hf.installed(model) is None
    assert torch.equal(logits(model, ids), before)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_p_on_activations_equals_p_on_weights(kind):
    stock = tiny(kind)
    on_weights = randomize(rotary.hf.install(copy.deepcopy(stock)))
    on_outputs = rotary.hf.install(copy.deepcopy(stock), mix_on="activations")
    on_outputs.load_state_dict(on_weights.state_dict())  # the same tensors: mix_on is how, not what
    assert not any("forward" in m.__dict__ for m in on_outputs.modules())
    ids = tokens()
    assert max_diff(logits(on_outputs, ids), logits(on_weights, ids)) <= 1e-5
    rotary.fold(on_outputs)
    assert rotary.hf.installed(on_outputs) is None
    assert max_diff(logits(on_outputs, ids), logits(on_weights, ids)) <= 1e-5


def test_a_record_of_the_previous_version_still_loads(tmp_path):
    """Checkpoints written before the install record: config.rotary held install's keyword arguments and the
    state_dict had no record entry."""
    import json

    from safetensors.torch import load_file, save_file

    model = train_steps(randomize(rotary.hf.install(tiny("qwen2"), per_layer=True)))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rotary"] = {"learned_freq": False, "mixing": "givens", "per_layer": True, "scaling": None}
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = load_file(tmp_path / "model.safetensors")
    del state["model.rotary_install._extra_state"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    reloaded = rotary.hf.from_pretrained(transformers.AutoModelForCausalLM, tmp_path, attn_implementation="eager")
    assert rotary.hf.installed(reloaded).options == rotary.hf.installed(model).options
    ids = tokens()
    assert torch.equal(logits(reloaded.eval(), ids), logits(model, ids))
