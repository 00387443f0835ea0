"""Extraction from torch models: agreement with a manual forward pass, pooling, bad input."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from smd_dist.store import ActivationStore, StoreError
from smd_dist.store.extraction import ExtractionError, extract, first_tensor, pool


@pytest.fixture
def store(tmp_path):
    return ActivationStore(tmp_path / "store")


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.Flatten(),
        nn.Linear(6 * 6 * 6, 5),
    )


def batches_of(x, size):
    return [x[i : i + size] for i in range(0, len(x), size)]


@pytest.fixture
def images():
    return torch.randn(23, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_flatten_matches_manual_forward(store, images):
    model = small_cnn()
    recs = extract(model, batches_of(images, 5), layers=["1", "2", "4"], store=store,
                   model_name="cnn", progress=False)
    assert [(r.layer, r.n_neurons, r.n_stimuli) for r in recs] == [
        ("1", 4 * 64, 23), ("2", 6 * 36, 23), ("4", 5, 23)]
    with torch.no_grad():
        h1 = model[1](model[0](images))
        h2 = model[2](h1)
        out = model(images)
    np.testing.assert_allclose(store.read("cnn", "1"), h1.reshape(23, -1).numpy(), rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(store.read("cnn", "2"), h2.reshape(23, -1).numpy(), rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(store.read("cnn", "4"), out.numpy(), rtol=1e-6, atol=1e-6)
    attrs = recs[0].attrs
    assert attrs["module"] == "1" and attrs["pooling"] == "flatten"
    assert attrs["source"] == "smd_dist.extract" and attrs["model_class"] == "Sequential"


def test_mean_pooling_of_conv_maps_and_layer_renames(store, images):
    model = small_cnn()
    extract(model, batches_of(images, 8), layers={"1": "conv1", "2": "features/2"},
            store=store, model_name="cnn.v1", pooling="mean", progress=False)
    with torch.no_grad():
        h1 = model[1](model[0](images))
        h2 = model[2](h1)
    np.testing.assert_allclose(store.read("cnn.v1", "conv1"), h1.mean(dim=(2, 3)).numpy(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(store.read("cnn.v1", "features/2"), h2.mean(dim=(2, 3)).numpy(),
                               rtol=1e-5, atol=1e-6)
    assert {r.rep_id for r in store.list()} == {"cnn.v1/conv1", "cnn.v1/features/2"}


def test_numpy_batches_and_stimulus_ids(store, images):
    model = small_cnn()
    ids = [f"img{i}" for i in range(23)]
    extract(model, batches_of(images.numpy(), 10), layers=["4"], store=store,
            model_name="cnn", stimulus_ids=ids, progress=False)
    assert store.stimulus_ids.tolist() == ids
    with pytest.raises(StoreError, match="cnn2/4 has at least 30 stimuli, the store expects 23"):
        extract(model, batches_of(torch.randn(30, 3, 8, 8), 10), layers=["4"], store=store,
                model_name="cnn2", progress=False)
    assert [r.model for r in store.list()] == ["cnn"]


class TupleOut(nn.Module):
    """Returns (hidden, attention) like a transformers layer."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        h = self.lin(x)
        return h, torch.ones(x.shape[0], 2)


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return {"other": torch.zeros(1), "last_hidden_state": self.lin(x)}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = TupleOut()
        self.head = DictOut()

    def forward(self, x):
        h, _ = self.block(x)
        return self.head(torch.cat([h, x[:, :1]], dim=1))


def test_tuple_and_dict_outputs(store):
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(9, 4)
    extract(net, batches_of(x, 4), layers=["block", "head"], store=store, model_name="n",
            progress=False)
    with torch.no_grad():
        h = net.block.lin(x)
        out = net.head.lin(torch.cat([h, x[:, :1]], dim=1))
    np.testing.assert_allclose(store.read("n", "block"), h.numpy(), rtol=1e-6)
    np.testing.assert_allclose(store.read("n", "head"), out.numpy(), rtol=1e-6)


class TinyTransformer(nn.Module):
    """Token model called with input_ids and attention_mask, outputs (B, T, D)."""

    def __init__(self):
        super().__init__()
        self.embeddings = nn.Embedding(20, 6)
        self.layer = nn.Linear(6, 6)

    def forward(self, input_ids, attention_mask):
        return self.layer(self.embeddings(input_ids))


def test_token_mean_respects_the_attention_mask(store):
    torch.manual_seed(0)
    net = TinyTransformer()
    ids = torch.randint(1, 20, (7, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(7, 5, dtype=torch.long)
    mask[2, 3:] = 0
    mask[5, 1:] = 0
    ids = ids * mask  # padding id 0
    batches = [{"input_ids": ids[:4], "attention_mask": mask[:4]},
               {"input_ids": ids[4:], "attention_mask": mask[4:]}]
    extract(net, batches, layers=["embeddings", "layer"], store=store, model_name="tt",
            pooling="mean", progress=False)
    with torch.no_grad():
        hidden = net.layer(net.embeddings(ids))
    m = mask[..., None].float()
    expected = (hidden * m).sum(1) / m.sum(1)
    np.testing.assert_allclose(store.read("tt", "layer"), expected.numpy(), rtol=1e-5,
                               atol=1e-6)
    assert not np.allclose(store.read("tt", "layer"), hidden.mean(1).numpy(), atol=1e-4)
    # flatten keeps every token: T * D neurons
    extract(net, batches, layers=["layer"], store=store, model_name="tt-flat", progress=False)
    assert store.record("tt-flat", "layer").n_neurons == 30


def test_custom_token_mask_and_callable_pooling(store):
    torch.manual_seed(0)
    net = TinyTransformer()
    ids = torch.randint(1, 20, (4, 5), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "attention_mask": torch.ones(4, 5)}
    only_first = lambda b: torch.eye(5)[0].expand(b["input_ids"].shape[0], 5)  # noqa: E731
    extract(net, [batch], layers=["layer"], store=store, model_name="cls", pooling="mean",
            token_mask=only_first, progress=False)

    def last_token(out, _batch):
        return out[:, -1]

    extract(net, [batch], layers=["layer"], store=store, model_name="last", pooling=last_token,
            progress=False)
    with torch.no_grad():
        hidden = net.layer(net.embeddings(ids))
    np.testing.assert_allclose(store.read("cls", "layer"), hidden[:, 0].numpy(), rtol=1e-5)
    np.testing.assert_allclose(store.read("last", "layer"), hidden[:, -1].numpy(), rtol=1e-5)
    assert store.record("last", "layer").attrs["pooling"] == "last_token"


def test_eval_mode_no_grad_and_hooks_removed(store, images):
    model = small_cnn()
    model.add_module("drop", nn.Dropout(0.9))  # would randomise outputs in training mode
    model.train()
    seen = {}

    def spy(_m, _i, out):
        seen["grad"] = torch.is_grad_enabled()
        seen["training"] = _m.training

    model[4].register_forward_hook(spy)
    extract(model, [images], layers=["drop"], store=store, model_name="m", progress=False)
    extract(model, [images], layers=["drop"], store=store, model_name="m2", progress=False)
    np.testing.assert_array_equal(store.read("m", "drop"), store.read("m2", "drop"))
    assert seen == {"grad": False, "training": False}
    assert model.training  # restored
    assert all(len(m._forward_hooks) == 0 for m in model[:4]) and len(model[4]._forward_hooks) == 1


# --- bad input ---------------------------------------------------------------------------------


def test_unknown_layer_lists_the_ones_that_exist(store, images):
    with pytest.raises(ExtractionError, match=r"no module named 'conv9'.*modules are: 0, 1, 2"):
        extract(small_cnn(), [images], layers=["conv9"], store=store, model_name="m")
    net = Net()
    with pytest.raises(ExtractionError, match=r"did you mean 'block.lin'"):
        extract(net, [torch.randn(2, 4)], layers=["block.lni"], store=store, model_name="m")
    assert store.list() == []


def test_nan_in_a_batch_names_model_layer_and_rows(store, images):
    images = images.clone()
    images[7, 0, 0, 0] = float("nan")
    images[9, :, 2, 2] = float("inf")
    # The error comes with the first batch holding bad rows, for the first layer they reach.
    with pytest.raises(StoreError, match=r"cnn/1 at stimulus rows \[7, 9\]"):
        extract(small_cnn(), batches_of(images, 5), layers=["1", "4"], store=store,
                model_name="cnn", progress=False)
    assert store.list() == []
    with pytest.raises(StoreError, match=r"cnn/4 at stimulus rows \[7, 9\]"):
        extract(small_cnn(), batches_of(images, 5), layers=["4"], store=store,
                model_name="cnn", progress=False)
    assert store.list() == []


def test_wrong_neuron_count_in_a_later_batch(store):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
    batches = [torch.randn(4, 1, 6, 6), torch.randn(4, 1, 7, 7)]
    with pytest.raises(StoreError, match=r"m/1: batch of shape \(4, 50\).*expected 32 neurons"):
        extract(model, batches, layers=["1"], store=store, model_name="m", progress=False)
    assert store.list() == []


def test_existing_rep_is_refused_before_any_forward(store, images):
    model = small_cnn()
    extract(model, [images], layers=["4"], store=store, model_name="m", progress=False)
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(StoreError, match="m/4 already in.*overwrite"):
        extract(model, [images], layers=["4"], store=store, model_name="m", progress=False)
    assert calls == []
    extract(model, [images * 2], layers=["4"], store=store, model_name="m", overwrite=True,
            progress=False)
    assert len(store.list()) == 1


def test_module_called_twice_or_not_at_all(store):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.unused = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(self.lin(x))

    with pytest.raises(ExtractionError, match="called twice"):
        extract(Twice(), [torch.randn(2, 3)], layers=["lin"], store=store, model_name="t",
                progress=False)
    with pytest.raises(ExtractionError, match="'unused'.*was not called"):
        extract(Twice(), [torch.randn(2, 3)], layers=["unused"], store=store, model_name="t",
                progress=False)
    assert store.list() == []


def test_other_bad_arguments(store, images):
    with pytest.raises(ExtractionError, match="pooling must be"):
        extract(small_cnn(), [images], layers=["1"], store=store, model_name="m", pooling="max")
    with pytest.raises(ExtractionError, match="torch.nn.Module"):
        extract(lambda x: x, [images], layers=["1"], store=store, model_name="m")
    with pytest.raises(ExtractionError, match="empty"):
        extract(small_cnn(), [], layers=["1"], store=store, model_name="m", progress=False)
    with pytest.raises(ExtractionError, match="layers is empty"):
        extract(small_cnn(), [images], layers=[], store=store, model_name="m")
    with pytest.raises(ExtractionError, match="same layer name"):
        extract(small_cnn(), [images], layers={"1": "x", "2": "x"}, store=store, model_name="m")
    assert store.list() == []


def test_store_path_is_accepted(tmp_path, images):
    recs = extract(small_cnn(), [images], layers=["4"], store=str(tmp_path / "s"),
                   model_name="m", progress=False)
    assert ActivationStore(tmp_path / "s", mode="r").list() == recs


def test_helpers():
    t = torch.ones(2, 3)
    assert first_tensor((None, t)) is t
    assert first_tensor({"logits": t}) is t
    with pytest.raises(ExtractionError, match="without any tensor"):
        first_tensor((None, 1))
    assert pool(torch.ones(4), "mean").shape == (4, 1)
    with pytest.raises(ExtractionError, match="selects no tokens"):
        pool(torch.ones(2, 3, 4), "mean", token_mask=torch.tensor([[1, 1, 0], [0, 0, 0]]))
    with pytest.raises(ExtractionError, match="does not match"):
        pool(torch.ones(2, 3, 4), "mean", token_mask=torch.ones(2, 4))


def test_device_request_moves_model_and_batches(store, images):
    model = small_cnn()
    extract(model, [images.numpy()], layers=["4"], store=store, model_name="m", device="cpu",
            progress=False)
    with torch.no_grad():
        expected = model(images).numpy()
    np.testing.assert_allclose(store.read("m", "4"), expected, rtol=1e-6)
    if not torch.cuda.is_available():
        with pytest.warns(RuntimeWarning, match="CUDA is not available"):
            extract(model, [images], layers=["4"], store=store, model_name="m2",
                    device="cuda", progress=False)


# --- command line --------------------------------------------------------------------------


def test_cli_extract(tmp_path, monkeypatch, images):
    from click.testing import CliRunner

    from smd_dist.cli import main

    (tmp_path / "my_nets.py").write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),\n"
        "                               torch.nn.Flatten(), torch.nn.Linear(256, 5))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    np.save(tmp_path / "x.npy", images.numpy())
    (tmp_path / "ids.txt").write_text("".join(f"s{i}\n" for i in range(23)))
    run = CliRunner().invoke
    out = run(main, ["extract", "--model", "my_nets:build", "--list-layers"])
    assert out.exit_code == 0 and "1\tReLU" in out.output
    store_path = str(tmp_path / "acts")
    args = ["extract", store_path, "--model", "my_nets:build", "--inputs",
            str(tmp_path / "x.npy"), "-l", "1,3", "--name", "net.v1", "--pooling", "mean",
            "--batch-size", "6", "--ids", str(tmp_path / "ids.txt")]
    out = run(main, args)
    assert out.exit_code == 0, out.output
    assert "net.v1/1\t23 x 4" in out.output and "net.v1/3\t23 x 5" in out.output
    store = ActivationStore(store_path, mode="r")
    assert store.stimulus_ids[-1] == "s22"
    import my_nets

    with torch.no_grad():
        expected = my_nets.build()(images).numpy()
    np.testing.assert_allclose(store.read("net.v1", "3"), expected, rtol=1e-5, atol=1e-6)
    out = run(main, args)  # again: refused, with a clean message (2: bad input)
    assert out.exit_code == 2 and "--overwrite" in out.output and "Traceback" not in out.output
    assert out.output.startswith("smd-dist: error: ")
    assert run(main, args + ["--overwrite"]).exit_code == 0
    out = run(main, [*args[:6], "-l", "nope", "--name", "x"])
    assert out.exit_code == 2 and "no module named 'nope'" in out.output
    torch.save(my_nets.build(), tmp_path / "net.pt")
    out = run(main, ["extract", store_path, "--model", str(tmp_path / "net.pt"), "--inputs",
                     str(tmp_path / "x.npy"), "-l", "3", "--name", "from-file",
                     "--trust-model-file"])
    assert out.exit_code == 0, out.output
    np.testing.assert_allclose(store.read("from-file", "3"), expected, rtol=1e-5, atol=1e-6)
    out = run(main, ["extract", store_path, "--model", "my_nets:build"])
    assert out.exit_code == 2 and "missing --inputs, --layer, --name" in out.output
    # NAME=MODULE names a stored layer, as extract(layers={module: name}) does; the layers
    # are stored in forward order whatever order they were named in.
    out = run(main, [*args[:6], "-l", "logits=3", "-l", "relu = 1", "--name", "named"])
    assert out.exit_code == 0, out.output
    assert [r.layer for r in store.list() if r.model == "named"] == ["relu", "logits"]
    assert store.record("named", "relu").attrs["module"] == "1"
    np.testing.assert_array_equal(store.read("named", "logits"), store.read("net.v1", "3"))


class _Planted:
    """Unpickling this runs code: it makes the folder ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_cli_extract_runs_no_code_from_a_model_file_it_was_not_told_to_trust(tmp_path,
                                                                              images):
    """Defect 7: `extract --model file.pt` unpickled any file, even with --list-layers."""
    import pickle

    from click.testing import CliRunner

    from smd_dist.cli import main

    marker = tmp_path / "code-ran"
    torch.save(_Planted(str(marker)), tmp_path / "evil.pt")
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(_Planted(str(marker))))
    np.save(tmp_path / "x.npy", images.numpy())
    for model in ("evil.pt", "evil.pkl"):
        for rest in (["--list-layers"], [str(tmp_path / "acts"), "--inputs",
                                         str(tmp_path / "x.npy"), "-l", "3", "--name", "n"]):
            out = CliRunner().invoke(main, ["extract", "--model", str(tmp_path / model), *rest])
            assert not marker.exists(), f"{model} {rest}: code from the file ran"
            assert out.exit_code == 2 and "--trust-model-file" in out.output, out.output
    out = CliRunner().invoke(main, ["extract", "--model", str(tmp_path / "evil.pt"),
                                    "--list-layers", "--trust-model-file"])
    assert marker.exists()  # trusted: loaded as asked (the file was not a model)
    assert out.exit_code != 0 and "not a torch.nn.Module" in out.output


def test_cli_extract_loads_weights_into_a_factory_without_unpickling_code(tmp_path,
                                                                          monkeypatch, images):
    from click.testing import CliRunner

    from smd_dist.cli import main

    (tmp_path / "arch.py").write_text(
        "import torch\n"
        "def build():\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 5))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import arch

    torch.manual_seed(3)
    trained = arch.build()
    torch.save(trained.state_dict(), tmp_path / "weights.pt")
    np.save(tmp_path / "x.npy", images[:, :, :8, :8].numpy())
    store_path = str(tmp_path / "acts")
    run = CliRunner().invoke
    out = run(main, ["extract", store_path, "--model", "arch:build", "--weights",
                     str(tmp_path / "weights.pt"), "--inputs", str(tmp_path / "x.npy"),
                     "-l", "1", "--name", "trained"])
    assert out.exit_code == 0, out.output
    with torch.no_grad():
        expected = trained(images[:, :, :8, :8]).numpy()
    got = ActivationStore(store_path, mode="r").read("trained", "1")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    out = run(main, ["extract", "--model", str(tmp_path / "weights.pt"), "--list-layers"])
    assert out.exit_code == 2 and "--weights" in out.output
    torch.save({"0.weight": torch.zeros(2, 2)}, tmp_path / "wrong.pt")
    out = run(main, ["extract", "--model", "arch:build", "--weights",
                     str(tmp_path / "wrong.pt"), "--list-layers"])
    assert out.exit_code == 2 and "wrong.pt" in out.output and "Traceback" not in out.output


def test_custom_forward_for_image_label_batches(store, images):
    model = small_cnn()
    labels = torch.arange(23)
    loader = [(images[i : i + 8], labels[i : i + 8]) for i in range(0, 23, 8)]
    extract(model, loader, layers=["4"], store=store, model_name="m",
            forward=lambda m, b: m(b[0]), progress=False)
    with torch.no_grad():
        expected = model(images).numpy()
    np.testing.assert_allclose(store.read("m", "4"), expected, rtol=1e-5, atol=1e-6)


def test_url_store_is_read_only(tmp_path, images):
    """A store at a URL reads through fsspec; writing needs a file system's locks."""
    import uuid

    url = f"memory://smd-dist-test-{uuid.uuid4().hex}/store"
    with pytest.raises(StoreError, match="is a URL.*mode='r'"):
        extract(small_cnn(), [images], layers=["4"], store=url, model_name="m",
                progress=False)
    recs = extract(small_cnn(), [images], layers=["4"], store=tmp_path / "s", model_name="m",
                   progress=False)
    url = f"file://{tmp_path / 's'}"
    again = ActivationStore(url, mode="r", storage_options={"auto_mkdir": False})
    assert again.list() == recs and again.path == url
    assert again.verify().ok


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_extraction_matches_cpu(tmp_path, images):
    cpu = ActivationStore(tmp_path / "cpu")
    gpu = ActivationStore(tmp_path / "gpu")
    extract(small_cnn(), [images], layers=["1", "4"], store=cpu, model_name="m", progress=False)
    model = small_cnn()
    extract(model, batches_of(images, 7), layers=["1", "4"], store=gpu, model_name="m",
            device="cuda", progress=False)
    assert next(model.parameters()).device.type == "cuda"
    for layer in ("1", "4"):
        np.testing.assert_allclose(gpu.read("m", layer), cpu.read("m", layer), rtol=1e-4,
                                   atol=1e-5)


def test_layers_are_stored_in_forward_order_and_returned_as_named(store, images):
    # Named out of order, with names whose sort order is neither: the store keeps depth.
    layers = {"4": "a-logits", "1": "z-relu", "2": "m-conv"}
    recs = extract(small_cnn(), batches_of(images, 8), layers=layers, store=store,
                   model_name="cnn", progress=False)
    assert [r.layer for r in recs] == ["a-logits", "z-relu", "m-conv"]
    assert [r.layer for r in store.list()] == ["z-relu", "m-conv", "a-logits"]
