"""NIN as ninpy.models.nin builds it, written in torch.nn, for side-by-side benchmarks and parity checks.

    torch_nin(torch)                                        # the authors' CIFAR-10 NIN
    torch_nin(torch, weights, **ninpy.models.PRESETS["fashion-mnist"], dropout=0.0)
"""

CIFAR_WIDTHS = ((192, 160, 96), (192, 192, 192), (192, 192, None))  # as ninpy.models.CIFAR_WIDTHS


def torch_nin(torch, weights=None, in_channels=3, num_classes=10, widths=CIFAR_WIDTHS,
              kernel_sizes=(5, 5, 3), dropout=0.5, make_dropout=None):
    """NIN in torch.nn with the arguments of ninpy.models.nin (widths: None stands for num_classes).

    weights: arrays in the order of ninpy's model.parameters(), copied in. make_dropout: a function
    of p giving the dropout module (default torch.nn.Dropout), e.g. one that draws ninpy's masks.
    """
    nn = torch.nn
    make_dropout = make_dropout or nn.Dropout

    def mlpconv(c_in, block_widths, k):
        c1, c2, c3 = (num_classes if w is None else w for w in block_widths)
        relu = lambda: nn.ReLU(inplace=True)  # noqa: E731  (PyTorch at its leanest in memory)
        return [nn.Conv2d(c_in, c1, k, padding=k // 2), relu(), nn.Conv2d(c1, c2, 1), relu(),
                nn.Conv2d(c2, c3, 1), relu()], c3

    block1, c = mlpconv(in_channels, widths[0], kernel_sizes[0])
    block2, c = mlpconv(c, widths[1], kernel_sizes[1])
    block3, _ = mlpconv(c, widths[2], kernel_sizes[2])
    net = nn.Sequential(
        *block1, nn.MaxPool2d(3, 2, ceil_mode=True), make_dropout(dropout),
        *block2, nn.AvgPool2d(3, 2, ceil_mode=True), make_dropout(dropout),
        *block3, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    if weights is not None:
        with torch.no_grad():
            theirs_all, weights = list(net.parameters()), list(weights)
            if len(theirs_all) != len(weights):
                raise ValueError(f"torch_nin: {len(weights)} weights for {len(theirs_all)} parameters")
            for theirs, ours in zip(theirs_all, weights):
                if tuple(theirs.shape) != tuple(ours.shape):  # copy_ would broadcast a wrong shape
                    raise ValueError(f"torch_nin: a weight of shape {tuple(ours.shape)} for a "
                                     f"parameter of shape {tuple(theirs.shape)}")
                theirs.copy_(torch.from_numpy(ours))
    return net
