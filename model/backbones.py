"""Frame-feature backbones: the ImageNet CNNs the published features were made with, from
torchvision (imported only here: the `video` extra).

    vgg16     4,096-d: VGG16's first fully connected layer after its ReLU ("relu6",
              classifier[0:2]), the layer of the UCF101/HMDB51/FCVID features
    resnet50  2,048-d: ResNet-50's global average pool, before the classifier (ActivityNet)

Each takes (n, 3, 224, 224) float images normalised with ImageNet's mean and std and returns
(n, D) features. Weights: 'imagenet' (torchvision fetches them on first use, where the machine
reaches its host), a path to a state dict saved from torchvision's model, or 'random' (a
randomly initialised network, for tests and speed measurements only).
"""
import os

import torch
import torch.nn as nn

from utils.errors import UserError

FEATURE_SIZES = {"vgg16": 4096, "resnet50": 2048}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP, RESIZE = 224, 256


class VGG16Relu6(nn.Module):
    def __init__(self, vgg):
        super().__init__()
        self.features, self.avgpool = vgg.features, vgg.avgpool
        self.fc6 = nn.Sequential(*list(vgg.classifier.children())[:2])     # Linear, ReLU

    def forward(self, images):
        return self.fc6(torch.flatten(self.avgpool(self.features(images)), 1))


class ResNet50Pool(nn.Module):
    def __init__(self, resnet):
        super().__init__()
        resnet.fc = nn.Identity()
        self.resnet = resnet

    def forward(self, images):
        return self.resnet(images)


def build_backbone(name, weights="imagenet"):
    """The frame-feature network `name` ('vgg16' | 'resnet50') in eval mode, on the CPU."""
    if name not in FEATURE_SIZES:
        raise UserError(f"--backbone must be one of {sorted(FEATURE_SIZES)}, got {name!r}")
    try:
        import torchvision.models as models
    except ImportError as err:
        raise UserError(f"the backbones come from torchvision, which does not import here "
                        f"({err}); pip install -e .[video] with a torchvision built for this "
                        f"torch") from None
    make, pretrained = {"vgg16": (models.vgg16, models.VGG16_Weights.IMAGENET1K_V1),
                        "resnet50": (models.resnet50,
                                     models.ResNet50_Weights.IMAGENET1K_V1)}[name]
    if weights == "imagenet":
        try:
            net = make(weights=pretrained)
        except Exception as err:   # no network, a broken download: torchvision raises many kinds
            raise UserError(f"cannot fetch the ImageNet weights of {name} ({type(err).__name__}: "
                            f"{err}); download them where the machine can and give --weights "
                            f"PATH") from None
    else:
        net = make(weights=None)
        if weights != "random":
            _load_state(net, weights, name)
    wrapped = VGG16Relu6(net) if name == "vgg16" else ResNet50Pool(net)
    return wrapped.eval()


def _load_state(net, path, name):
    if not os.path.isfile(path):
        raise UserError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except Exception as err:       # unreadable or of another network
        raise UserError(f"{path}: not the weights of torchvision's {name} "
                        f"({type(err).__name__})") from None


def preprocess_frames(frames, device):
    """(M, H, W, 3) uint8 RGB frames -> (M, 3, 224, 224) float: shorter side resized to 256
    (bilinear, antialiased), the centre 224 x 224 cropped, ImageNet-normalised; on `device`."""
    x = torch.as_tensor(frames).to(device).permute(0, 3, 1, 2).float().div_(255)
    height, width = x.shape[-2:]
    scale = RESIZE / min(height, width)
    size = (max(CROP, round(height * scale)), max(CROP, round(width * scale)))
    x = nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True,
                                  align_corners=False)
    top, left = (size[0] - CROP) // 2, (size[1] - CROP) // 2
    x = x[:, :, top:top + CROP, left:left + CROP]
    mean = torch.tensor(IMAGENET_MEAN, device=device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=device)[:, None, None]
    return (x - mean) / std
