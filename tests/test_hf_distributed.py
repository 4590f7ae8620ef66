"""transformers.Trainer on a tiny Llama with rotary installed: train, checkpoint, resume; one process and torchrun.

Each run is a subprocess (Trainer and torch.distributed keep process-wide state) with a short timeout.
"""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch, transformers
    import rotary.integrations.hf

    out, mode = sys.argv[1], sys.argv[2]  # mode: "straight" (4 steps) or "resume" (from checkpoint-2 to 4)
    rank = int(os.environ.get("RANK", 0))
    transformers.set_seed(0)
    config = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
        vocab_size=97, max_position_embeddings=64, initializer_range=0.1, pad_token_id=0,
    )
    model = rotary.hf.install(transformers.LlamaForCausalLM(config), per_layer=True)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 97, (32, 16), generator=g)]
    args = transformers.TrainingArguments(
        output_dir=os.path.join(out, "run"), max_steps=4, save_steps=2, per_device_train_batch_size=4,
        learning_rate=0.05, use_cpu=True, report_to=[], logging_steps=1, seed=0,
        dataloader_num_workers=0, disable_tqdm=True, ddp_find_unused_parameters=False,
        ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None,  # one process: no process group at all
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    if mode == "resume":
        trainer.train(resume_from_checkpoint=os.path.join(out, "run", "checkpoint-2"))
    else:
        trainer.train()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(state, os.path.join(out, f"{mode}-rank{rank}.pt"))
    """
)


def _run(tmp_path, mode, processes):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if processes == 1:
        command = [sys.executable, str(script), str(tmp_path), mode]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--standalone", str(script), str(tmp_path), mode]
    # its own session, so that a timeout ends torchrun's workers too, not only torchrun
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    assert process.returncode == 0, stderr[-4000:]
    return [torch.load(tmp_path / f"{mode}-rank{r}.pt") for r in range(processes)]


@pytest.mark.parametrize("processes", [1, 2])
def test_trainer_trains_checkpoints_and_resumes(tmp_path, processes):
    straight = _run(tmp_path, "straight", processes)
    assert (tmp_path / "run" / "checkpoint-2" / "model.safetensors").exists()
    config = (tmp_path / "run" / "checkpoint-2" / "config.json").read_text()
    assert '"rotary"' in config and '"per_layer": true' in config
    resumed = _run(tmp_path, "resume", processes)
    angles = [k for k in straight[0] if k.endswith("rotary.mixing.angles")]
    assert len(angles) == 2 and all(straight[0][k].abs().max() > 0 for k in angles)  # the rotary trained
    for states in (straight, resumed):
        for state in states[1:]:  # every rank holds the same parameters
            assert all(torch.equal(state[k], states[0][k]) for k in states[0])
    for k in straight[0]:  # resuming from step 2 lands where training straight through does
        torch.testing.assert_close(resumed[0][k], straight[0][k], rtol=1e-5, atol=1e-6)
