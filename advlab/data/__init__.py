"""Data readers: UNITER feature and text databases, LXMERT obj36 features, image-caption folders.

Optional packages (lmdb, msgpack, lz4, numpy, Pillow) are imported inside the functions that need them.
"""

from advlab.data.captions import CaptionedImage as CaptionedImage
from advlab.data.captions import CaptionSplits as CaptionSplits
from advlab.data.captions import ImageCaptionFolder as ImageCaptionFolder
from advlab.data.captions import caption_key as caption_key
from advlab.data.captions import scan_caption_folder as scan_caption_folder
from advlab.data.captions import split_by_caption as split_by_caption
from advlab.data.obj36 import Obj36Record as Obj36Record
from advlab.data.obj36 import collate_obj36 as collate_obj36
from advlab.data.obj36 import iter_obj36 as iter_obj36
from advlab.data.obj36 import load_obj36 as load_obj36
from advlab.data.tuxpaint import tuxpaint_stamps_dir as tuxpaint_stamps_dir
from advlab.data.uniter_db import UniterImgDb as UniterImgDb
from advlab.data.uniter_db import UniterTxtDb as UniterTxtDb
from advlab.data.uniter_db import UniterVqaDataset as UniterVqaDataset
from advlab.data.uniter_db import get_gather_index as get_gather_index
from advlab.data.uniter_db import pos_feat_from_norm_bb as pos_feat_from_norm_bb
from advlab.data.uniter_db import uniter_collate as uniter_collate
from advlab.data.uniter_db import vqa_target as vqa_target

__all__ = [
    "CaptionSplits",
    "CaptionedImage",
    "ImageCaptionFolder",
    "Obj36Record",
    "UniterImgDb",
    "UniterTxtDb",
    "UniterVqaDataset",
    "caption_key",
    "collate_obj36",
    "get_gather_index",
    "iter_obj36",
    "load_obj36",
    "pos_feat_from_norm_bb",
    "scan_caption_folder",
    "split_by_caption",
    "tuxpaint_stamps_dir",
    "uniter_collate",
    "vqa_target",
]
