"""The CIFAR-10 NIN of docs/design.md written in torch.nn, for side-by-side benchmarks and parity checks."""


def torch_nin(torch, weights=None, num_classes=10):
    """NIN in torch.nn; with `weights` (arrays in the order of ninpy's model.parameters()), copied in."""
    nn = torch.nn

    def mlpconv(c_in, widths, k):
        c1, c2, c3 = widths
        relu = lambda: nn.ReLU(inplace=True)  # noqa: E731  (PyTorch at its leanest in memory)
        return [nn.Conv2d(c_in, c1, k, padding=k // 2), relu(), nn.Conv2d(c1, c2, 1), relu(),
                nn.Conv2d(c2, c3, 1), relu()]

    net = nn.Sequential(
        *mlpconv(3, (192, 160, 96), 5), nn.MaxPool2d(3, 2, ceil_mode=True), nn.Dropout(0.5),
        *mlpconv(96, (192, 192, 192), 5), nn.AvgPool2d(3, 2, ceil_mode=True), nn.Dropout(0.5),
        *mlpconv(192, (192, 192, num_classes), 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    if weights is not None:
        with torch.no_grad():
            for theirs, ours in zip(net.parameters(), weights):
                theirs.copy_(torch.from_numpy(ours))
    return net
