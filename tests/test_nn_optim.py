"""Modules, the NIN model and its presets, SGD and schedules (against torch.optim when installed)."""
import inspect
import math
from pathlib import Path

import numpy as np
import pytest

import ninpy
import ninpy.functional as F
from ninpy import Tensor, models, nn, optim


@pytest.mark.parametrize("dataset, count", [("cifar10", 966_986), ("cifar100", 984_356),
                                            ("mnist", 349_674), ("fashion-mnist", 349_674),
                                            ("svhn", 1_986_026)])
def test_parameter_counts_match_the_paper_models(dataset, count):
    assert models.nin_for(dataset).num_parameters() == count


def test_default_nin_is_cifar10_layout():
    model = models.nin()
    assert model.num_parameters() == 966_986
    x = Tensor(np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32))
    maps = model.eval().class_maps(x)
    assert maps.shape == (2, 10, 8, 8)
    assert model(x).shape == (2, 10)
    # forward pools the maps in the working layout, with no swap back: the same logits
    np.testing.assert_allclose(model(x).data, F.global_avg_pool2d(maps).data, rtol=1e-6)


def test_mnist_variant_pools_28_to_7():
    model = models.nin_for("mnist").eval()
    x = Tensor(np.zeros((1, 1, 28, 28), dtype=np.float32))
    assert model.class_maps(x).shape == (1, 10, 7, 7)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="known: cifar10"):
        models.nin_for("imagenet")


def test_state_dict_round_trip_and_errors():
    ninpy.manual_seed(1)
    a = models.nin_for("mnist")
    ninpy.manual_seed(2)
    b = models.nin_for("mnist")
    b.load_state_dict(a.state_dict())
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(pa.data, pb.data, err_msg=name)
    with pytest.raises(KeyError, match="missing"):
        b.load_state_dict({})
    state = a.state_dict()
    state["features.0.conv.bias"] = np.zeros(3, dtype=np.float32)
    with pytest.raises(ValueError, match="features.0.conv.bias"):
        b.load_state_dict(state)


def test_state_dict_is_a_copy():
    model = models.nin_for("mnist")
    state = model.state_dict()
    state["features.0.conv.bias"][:] = 7.0
    assert not np.any(model.features[0].conv.bias.data == 7.0)


def every_module(root):
    """Every Module reachable from root through attributes, lists, tuples and dicts, found without
    Module.named_modules, so that a module it misses is missed by this test's count, not by both."""
    found, pending, seen = [], [root], set()
    while pending:
        value = pending.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, nn.Module):
            found.append(value)
            pending.extend(vars(value).values())
        elif isinstance(value, (list, tuple)):
            pending.extend(value)
        elif isinstance(value, dict):
            pending.extend(value.values())
    return found


def test_train_and_eval_reach_every_submodule():
    model = models.nin_for("mnist")
    modules = every_module(model)
    dropouts = [m for m in modules if isinstance(m, nn.Dropout)]
    assert len(modules) == len(list(model.named_modules())) == 19 and len(dropouts) == 2
    ones = Tensor(np.ones(1000, dtype=np.float32))
    x = Tensor(np.ones((1, 1, 28, 28), dtype=np.float32))
    for mode in (False, True, False):
        model.train(mode)
        assert [m.training for m in modules] == [mode] * len(modules)
        for dropout in dropouts:                     # each dropout drops exactly when training
            assert (dropout(ones).data == 0).any() == mode
    np.testing.assert_array_equal(model(x).data, model(x).data)   # evaluation repeats exactly


def test_he_initialisation_std():
    ninpy.manual_seed(0)
    conv = nn.Conv2d(96, 192, 5)
    assert conv.weight.data.std() == pytest.approx(math.sqrt(2 / (96 * 25)), rel=0.02)
    assert not conv.bias.data.any()
    fixed = nn.Conv2d(3, 8, 3, init_std=0.05)
    assert fixed.weight.data.std() == pytest.approx(0.05, rel=0.2)


def test_sequential_names_and_indexing():
    seq = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 3, 1))
    assert [name for name, _ in seq.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert isinstance(seq[1], nn.ReLU) and len(seq) == 3


def test_mlpconv_equals_its_three_convs_with_relu():
    rng = np.random.default_rng(0)
    block = nn.MLPConv(2, (4, 3, 5), kernel_size=3, padding=1, dtype=np.float64)
    for conv in (block.conv, block.cccp1, block.cccp2):
        conv.bias.data = rng.standard_normal(conv.bias.shape)
    x = Tensor(rng.standard_normal((2, 2, 5, 5)))
    expected = x
    for conv in (block.conv, block.cccp1, block.cccp2):
        expected = F.relu(conv(expected))
    np.testing.assert_allclose(block(x).data, expected.data, rtol=1e-12)


def _quadratic_params(rng, dtype=np.float64):
    return [nn.Parameter(rng.standard_normal((3, 4)).astype(dtype)),
            nn.Parameter(rng.standard_normal(4).astype(dtype))]


def _run_ninpy(params, make_opt, targets, steps):
    opt = make_opt(params)
    for _ in range(steps):
        opt.zero_grad()
        loss = sum((((p - Tensor(t)) ** 2.0).sum() for p, t in zip(params, targets)), Tensor(0.0))
        loss.backward()
        opt.step()
    return [p.data for p in params]


@pytest.mark.parametrize("momentum, weight_decay, nesterov", [(0.0, 0.0, False), (0.9, 0.0, False),
                                                              (0.9, 1e-2, False), (0.9, 1e-2, True)])
def test_sgd_matches_torch(momentum, weight_decay, nesterov):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    start = _quadratic_params(rng)
    targets = [rng.standard_normal(p.shape) for p in start]
    ours = _run_ninpy([nn.Parameter(p.data.copy()) for p in start],
                      lambda ps: optim.SGD([{"params": ps[:1]}, {"params": ps[1:], "lr": 0.2,
                                                                  "weight_decay": 0.0}],
                                           lr=0.05, momentum=momentum, weight_decay=weight_decay,
                                           nesterov=nesterov),
                      targets, steps=5)
    theirs = [torch.tensor(p.data.copy(), requires_grad=True) for p in start]
    opt = torch.optim.SGD([{"params": theirs[:1]}, {"params": theirs[1:], "lr": 0.2, "weight_decay": 0.0}],
                          lr=0.05, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    for _ in range(5):
        opt.zero_grad()
        sum(((p - torch.tensor(t)) ** 2).sum() for p, t in zip(theirs, targets)).backward()
        opt.step()
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b.detach().numpy(), rtol=1e-12, atol=1e-12)


def test_sgd_first_step_by_hand():
    p = nn.Parameter(np.array([1.0, -2.0]))
    p.grad = np.array([0.5, 0.5])
    opt = optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.1)
    opt.step()
    np.testing.assert_allclose(p.data, [1.0 - 0.1 * (0.5 + 0.1), -2.0 - 0.1 * (0.5 - 0.2)])


def test_sgd_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(4)
    start = _quadratic_params(rng)
    targets = [rng.standard_normal(p.shape) for p in start]
    make = lambda ps: optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3)  # noqa: E731
    straight = _run_ninpy([nn.Parameter(p.data.copy()) for p in start], make, targets, steps=6)

    first = [nn.Parameter(p.data.copy()) for p in start]
    opt = make(first)
    _run_ninpy(first, lambda ps: opt, targets, steps=3)
    saved = opt.state_dict()
    second = [nn.Parameter(p.data.copy()) for p in first]
    opt2 = make(second)
    opt2.load_state_dict(saved)
    resumed = _run_ninpy(second, lambda ps: opt2, targets, steps=3)
    for a, b in zip(straight, resumed):
        np.testing.assert_array_equal(a, b)


def test_sgd_rejects_bad_settings():
    p = [nn.Parameter(np.zeros(1))]
    with pytest.raises(ValueError, match="learning rate"):
        optim.SGD(p, lr=-1.0)
    with pytest.raises(ValueError, match="Nesterov"):
        optim.SGD(p, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="more than once"):   # as torch.optim.SGD refuses it
        optim.SGD([{"params": p}, {"params": p, "lr": 0.2}], lr=0.1)


def test_multistep_schedule_keeps_group_multipliers():
    a, b = nn.Parameter(np.zeros(1)), nn.Parameter(np.zeros(1))
    opt = optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.2}], lr=0.1)
    schedule = optim.MultiStepLR(opt, milestones=[2, 4], gamma=0.1)
    seen = []
    for _ in range(5):
        seen.append(schedule.get_last_lr())
        schedule.step()
    np.testing.assert_allclose(seen, [[0.1, 0.2], [0.1, 0.2], [0.01, 0.02], [0.01, 0.02],
                                      [0.001, 0.002]])
    fresh = optim.MultiStepLR(optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.2}], lr=0.1),
                              milestones=[2, 4])
    fresh.load_state_dict(schedule.state_dict())
    np.testing.assert_allclose(fresh.get_last_lr(), schedule.get_last_lr())


def test_cosine_schedule_matches_torch():
    torch = pytest.importorskip("torch")
    p = nn.Parameter(np.zeros(1))
    ours = optim.CosineAnnealingLR(optim.SGD([p], lr=0.1), T_max=10, eta_min=0.001)
    tp = torch.zeros(1, requires_grad=True)
    topt = torch.optim.SGD([tp], lr=0.1)
    theirs = torch.optim.lr_scheduler.CosineAnnealingLR(topt, T_max=10, eta_min=0.001)
    for _ in range(10):
        assert ours.get_last_lr()[0] == pytest.approx(theirs.get_last_lr()[0], rel=1e-9)
        topt.step()
        ours.step()
        theirs.step()


def _small_nin():
    ninpy.manual_seed(0)
    return models.nin(in_channels=2, num_classes=3, widths=((4, 3, 4), (4, 4, 4), (4, 4, None)),
                      kernel_sizes=(3, 3, 3), dropout=0.0)


def test_public_model_methods_take_n_c_h_w():
    """model.features(x) is the class maps of an (N, C, H, W) x, even with N == C (where reading
    x channels first would compute something else without an error)."""
    model = _small_nin().eval()
    x = Tensor(np.random.default_rng(1).standard_normal((2, 2, 8, 8)).astype(np.float32))
    np.testing.assert_allclose(model.features(x).data, model.class_maps(x).data, rtol=1e-6)
    np.testing.assert_allclose(model.features[0](x).data,
                               model.features[0]._forward_working(
                                   F.swap_batch_and_channels(x)).data.transpose(1, 0, 2, 3),
                               rtol=1e-6)
    assert "layout" not in inspect.signature(nn.MLPConv).parameters


def test_a_checkpoint_written_before_the_layout_change_still_loads():
    """tests/data/nin_checkpoint_v1.npz was saved by the code whose features() took channels
    first; its parameter names are unchanged, and the restored model computes what it did."""
    from ninpy import checkpoint
    data = Path(__file__).parent / "data"
    state = checkpoint.load(data / "nin_checkpoint_v1.npz")
    model = _small_nin()
    sgd = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    schedule = optim.MultiStepLR(sgd, [2])
    state.restore(model, sgd, schedule)
    assert schedule.last_epoch == 1 and len(sgd.momentum_buffers) == model_parameter_count(model)
    x = np.random.default_rng(0).standard_normal((2, 2, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(model.eval()(Tensor(x)).data,
                               np.load(data / "nin_checkpoint_v1_logits.npy"), rtol=1e-5, atol=1e-6)


def model_parameter_count(model):
    return len(list(model.parameters()))
