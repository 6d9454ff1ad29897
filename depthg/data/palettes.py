"""Class names, colour palettes and label mappings of the supported datasets.

COCO-Stuff-27: the 182 fine ids of the stuffthingmaps PNGs (value = COCO category id - 1; things
0..90, stuff 91..181; 255 = unlabelled) are mapped to the 27 coarse classes of the COCO-Stuff
hierarchy: the 12 thing super-categories followed by the 15 stuff super-categories, each group in
alphabetical order (the order STEGO and DepthG report). The table below is written from the
hierarchy (``COCO_HIERARCHY``: super-category -> fine names), not copied. Ids that COCO defines
but never annotates (street sign, hat, shoe, eye glasses, plate, mirror, window, desk, door,
blender, hair brush) are mapped to their super-category all the same. ``fog`` sits under ``water``
in the COCO-Stuff hierarchy and is mapped there.
"""
from __future__ import annotations

import colorsys

import numpy as np


def default_palette(n: int) -> np.ndarray:
    """``n`` well separated colours (golden-ratio hues, alternating lightness), uint8 [n,3]."""
    out = np.zeros((n, 3), np.uint8)
    for i in range(n):
        h = (i * 0.618033988749895) % 1.0
        l = (0.45, 0.62, 0.33)[i % 3]
        s = (0.85, 0.65, 0.9)[(i // 3) % 3]
        out[i] = [round(c * 255) for c in colorsys.hls_to_rgb(h, l, s)]
    return out


# ----------------------------------------------------------------------------- CamVid (SegNet 11)
CAMVID_CLASSES = ["sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence",
                  "car", "pedestrian", "bicyclist"]
CAMVID_PALETTE = np.array([
    [128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222], [128, 128, 0],
    [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192]], np.uint8)
CAMVID_VOID = 11

# ----------------------------------------------------------------------------- Cityscapes-27
# labelIds 7..33 -> 0..26 (labelId - 7); ids < 7 are ignored
CITYSCAPES_CLASSES = ["road", "sidewalk", "parking", "rail track", "building", "wall", "fence",
                      "guard rail", "bridge", "tunnel", "pole", "polegroup", "traffic light",
                      "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
                      "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle"]
CITYSCAPES_PALETTE = np.array([
    [128, 64, 128], [244, 35, 232], [250, 170, 160], [230, 150, 140], [70, 70, 70],
    [102, 102, 156], [190, 153, 153], [180, 165, 180], [150, 100, 100], [150, 120, 90],
    [153, 153, 153], [153, 153, 153], [250, 170, 30], [220, 220, 0], [107, 142, 35],
    [152, 251, 152], [70, 130, 180], [220, 20, 60], [255, 0, 0], [0, 0, 142], [0, 0, 70],
    [0, 60, 100], [0, 0, 90], [0, 0, 110], [0, 80, 100], [0, 0, 230], [119, 11, 32]], np.uint8)
CITYSCAPES_FIRST_ID = 7

# ----------------------------------------------------------------------------- Potsdam 6 -> 3
POTSDAM_CLASSES = ["roads and cars", "buildings and clutter", "trees and vegetation"]
# fine: 0 impervious surfaces, 1 building, 2 low vegetation, 3 tree, 4 car, 5 clutter
POTSDAM_FINE_TO_COARSE = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2}
POTSDAM_PALETTE = np.array([[128, 128, 128], [230, 60, 50], [60, 170, 60]], np.uint8)

# ----------------------------------------------------------------------------- COCO-Stuff-27
# fine names in id order (index = stuffthingmap value); things first (91 ids incl. unused), stuff after
COCO_FINE = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant "
    "street_sign stop_sign parking_meter bench bird cat dog horse sheep cow elephant bear zebra "
    "giraffe hat backpack umbrella shoe eye_glasses handbag tie suitcase frisbee skis snowboard "
    "sports_ball kite baseball_bat baseball_glove skateboard surfboard tennis_racket bottle plate "
    "wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot_dog "
    "pizza donut cake chair couch potted_plant bed mirror dining_table window desk toilet door tv "
    "laptop mouse remote keyboard cell_phone microwave oven toaster sink refrigerator blender book "
    "clock vase scissors teddy_bear hair_drier toothbrush hair_brush "
    # stuff (91..181)
    "banner blanket branch bridge building-other bush cabinet cage cardboard carpet ceiling-other "
    "ceiling-tile cloth clothes clouds counter cupboard curtain desk-stuff dirt door-stuff fence "
    "floor-marble floor-other floor-stone floor-tile floor-wood flower fog food-other fruit "
    "furniture-other grass gravel ground-other hill house leaves light mat metal mirror-stuff moss "
    "mountain mud napkin net paper pavement pillow plant-other plastic platform playingfield "
    "railing railroad river road rock roof rug salad sand sea shelf sky-other skyscraper snow "
    "solid-other stairs stone straw structural-other table tent textile-other towel tree vegetable "
    "wall-brick wall-concrete wall-other wall-panel wall-stone wall-tile wall-wood water-other "
    "waterdrops window-blind window-other wood"
).split()

COCO_HIERARCHY = {
    # things: 12 super-categories
    "electronic": "tv laptop mouse remote keyboard cell_phone",
    "appliance": "microwave oven toaster sink refrigerator blender",
    "food": "banana apple sandwich orange broccoli carrot hot_dog pizza donut cake",
    "furniture": "chair couch potted_plant bed mirror dining_table window desk toilet door",
    "indoor": "book clock vase scissors teddy_bear hair_drier toothbrush hair_brush",
    "kitchen": "bottle plate wine_glass cup fork knife spoon bowl",
    "accessory": "hat backpack umbrella shoe eye_glasses handbag tie suitcase",
    "animal": "bird cat dog horse sheep cow elephant bear zebra giraffe",
    "outdoor": "traffic_light fire_hydrant street_sign stop_sign parking_meter bench",
    "person": "person",
    "sports": "frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard "
              "surfboard tennis_racket",
    "vehicle": "bicycle car motorcycle airplane bus train truck boat",
    # stuff: 15 super-categories
    "ceiling": "ceiling-other ceiling-tile",
    "floor": "carpet floor-marble floor-other floor-stone floor-tile floor-wood",
    "food-stuff": "food-other fruit salad vegetable",
    "furniture-stuff": "cabinet counter cupboard desk-stuff door-stuff furniture-other light "
                       "mirror-stuff shelf stairs table",
    "raw-material": "cardboard metal paper plastic",
    "textile": "banner blanket cloth clothes curtain mat napkin pillow rug textile-other towel",
    "wall": "wall-brick wall-concrete wall-other wall-panel wall-stone wall-tile wall-wood",
    "window": "window-blind window-other",
    "building": "bridge building-other house roof skyscraper tent",
    "ground": "dirt gravel ground-other mud pavement platform playingfield railroad road sand snow",
    "plant": "branch bush flower grass leaves moss plant-other straw tree",
    "sky": "clouds sky-other",
    "solid": "hill mountain rock solid-other stone wood",
    "structural": "cage fence net railing structural-other",
    "water": "fog river sea water-other waterdrops",
}
COCO27_CLASSES = list(COCO_HIERARCHY)


def _coco_fine_to_coarse() -> np.ndarray:
    """Lookup table of 256 entries: fine id -> coarse id, 255 and unknown values -> -1."""
    coarse_of = {}
    for coarse, (_, names) in enumerate(COCO_HIERARCHY.items()):
        for name in names.split():
            if name in coarse_of:
                raise AssertionError(f"COCO fine class {name} listed twice")
            coarse_of[name] = coarse
    missing = [n for n in COCO_FINE if n not in coarse_of]
    if missing or len(COCO_FINE) != 182:
        raise AssertionError(f"COCO hierarchy incomplete: {missing} / {len(COCO_FINE)} fine ids")
    lut = np.full(256, -1, np.int64)
    for fine, name in enumerate(COCO_FINE):
        lut[fine] = coarse_of[name]
    return lut


COCO_FINE_TO_COARSE = _coco_fine_to_coarse()
COCO27_PALETTE = default_palette(27)

# ----------------------------------------------------------------------------- synthetic streets
SYNTHETIC_CLASSES = ["sky", "road", "sidewalk", "building", "vegetation", "pole", "car", "person"]
SYNTHETIC_PALETTE = np.array([
    [70, 130, 180], [128, 64, 128], [244, 35, 232], [70, 70, 70], [107, 142, 35],
    [153, 153, 153], [0, 0, 142], [220, 20, 60]], np.uint8)

