"""Model builders named by ``conf/model/*.yaml``; each returns an ``nn.Module`` in eval mode on the CPU.

- ``qaf.models.cifar_resnet.build``: CIFAR-10 ResNet-20/32/44/56 with packaged weights.
- ``qaf.models.torchvision_models.build``: torchvision models (weights API or a checkpoint).
"""
