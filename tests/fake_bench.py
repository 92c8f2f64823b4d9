"""A stand-in BackdoorBench checkout for tests: the module and function names the plugin
imports from a real checkout (defense.base.defense, dataset_and_transform_generate,
get_num_classes, get_input_shape, generate_cls_model, save_load_attack), with tiny
implementations of our own. It checks the plugin's plumbing, not the benchmark; a real
checkout is used only where PGBD_BENCH_ROOT names one."""

from pathlib import Path

FILES = {
    "defense/__init__.py": "",
    "defense/base.py": '''
class defense(object):
    def add_arguments(parser):
        pass
    def set_result(self):
        pass
    def set_trainer(self):
        pass
    def set_logger(self):
        pass
    def mitigation(self):
        pass
    def defense(self):
        pass
''',
    "utils/__init__.py": "",
    "utils/save_load_attack.py": "def save_defense_result(model_name, num_classes, model, save_path):\n    pass\n",
    "utils/aggregate_block/__init__.py": "",
    "utils/aggregate_block/dataset_and_transform_generate.py": '''
from PIL import Image
import torchvision.transforms as T
from pgbd_defense.datasets import load_split

def get_num_classes(name):
    return 10

def get_input_shape(name):
    return 28, 28, 1

def get_transform(name, h, w, train=True):
    return T.Compose([T.Resize((h, w)), T.ToTensor(), T.Normalize([0.5], [0.5])])

class _PIL:
    def __init__(self, split):
        self.split = split
    def __len__(self):
        return len(self.split)
    def __getitem__(self, i):
        return Image.fromarray(self.split.images[i, 0].numpy(), mode="L"), int(self.split.labels[i])

def dataset_and_transform_generate(args):
    train = _PIL(load_split("mnist", args.dataset_path, train=True))
    test = _PIL(load_split("mnist", args.dataset_path, train=False))
    train_t, test_t = get_transform(args.dataset, 28, 28, True), get_transform(args.dataset, 28, 28, False)
    return train, train_t, None, test, test_t, None
''',
    "utils/aggregate_block/model_trainer_generate.py": '''
from pgbd_defense.formats.models import build_model

def generate_cls_model(model_name, num_classes=10, image_size=32):
    return build_model(model_name, num_classes, in_channels=1, width=0.0625)
''',
    "config/defense/ft/cifar10.yaml": "epochs: 1\\n",
}


def make_fake_checkout(root: Path, data_dir: Path) -> Path:
    for rel, text in FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.lstrip("\\n"))
    data = root / "data" / "mnist"
    data.mkdir(parents=True, exist_ok=True)
    for f in Path(data_dir).iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    return root
