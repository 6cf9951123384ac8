"""absl flags of the dataset import tools (``ldr_tf.data.importer``, ``ldr_tf.data.ixi``, ``tools.import_ct``) and
of ``tools.show_dataset``.

Each ``define_*`` function takes the `flags.FlagValues` to define into. The tools parse their command line into a
fresh `FlagValues` per call (``run(argv)``), so tests can call them repeatedly in one process and the tools' flag
names (``--atlas``, ``--dataset``, ...) never collide with other tools' flags in the global ``FLAGS``.

Preprocessing flags default to ``None``, meaning "take the value of the recipe" (`ldr_tf.data.preprocess.RECIPES`).
"""

from __future__ import annotations

from absl import flags

from ldr_tf.data.preprocess import CROP_MODES, INTENSITY_MODES, LABEL_ORDERS, RECIPES, RESAMPLE_MODES

__all__ = [
    "define_preprocessing_flags",
    "define_output_flags",
    "define_import_nifti_flags",
    "define_import_ixi_flags",
    "define_import_ct_flags",
    "define_show_dataset_flags",
]


def define_preprocessing_flags(fv: flags.FlagValues, recipe_default: str = "none") -> None:
    """`ldr_tf.data.preprocess.Preprocessing` fields as flags (None = from the recipe)."""
    flags.DEFINE_enum("recipe", recipe_default, list(RECIPES), "Preset preprocessing: liver (CT, crop to the "
                      "liver, stretch, W/L 290/120, mask 0/255), brain (MRI, crop to the labels, keep_aspect, "
                      "1..99th percentile), brain-head (MRI, label-free: head box, 2 mm voxels on 128^3), none. "
                      "Any preprocessing flag given overrides the preset.",
                      flag_values=fv)
    flags.DEFINE_list("grid_size", None, "Network grid D,H,W (one number = a cube).", flag_values=fv)
    flags.DEFINE_string("orientation", None, "Orientation of the grid axes: 3 letters (RAS, LPS, ...) or 'native'. "
                        "Default RAS.", flag_values=fv)
    flags.DEFINE_enum("resample", None, list(RESAMPLE_MODES), "stretch: fit the field of view to the grid per "
                      "axis (anisotropic); keep_aspect: isotropic spacing, zero padding.", flag_values=fv)
    flags.DEFINE_enum("crop", None, list(CROP_MODES), "none: whole scan; labels: bounding box of --crop_labels "
                      "plus the margin; foreground: label-free, the bounding box of the largest region above an "
                      "Otsu threshold (head, body) plus the margin.", flag_values=fv)
    flags.DEFINE_float("spacing_mm", None, "Isotropic grid voxels of this many mm centred on the field of view "
                       "(instead of fitting the field of view to the grid).", flag_values=fv)
    flags.DEFINE_list("crop_labels", None, "Source label values defining the crop box and mask (empty: every "
                      "non-zero label).", flag_values=fv)
    flags.DEFINE_float("crop_margin_fraction", None, "Crop margin as a fraction of the box extent (default 0.1).",
                       flag_values=fv)
    flags.DEFINE_integer("crop_margin_voxels", None, "Minimum crop margin in source voxels (default 5).",
                         flag_values=fv)
    flags.DEFINE_enum("intensity", None, list(INTENSITY_MODES), "ct_window: W/L -> 0..255; percentile: "
                      "--percentiles -> 0..255; none: clip to 0..255.", flag_values=fv)
    flags.DEFINE_float("window", None, "CT window width in HU (default 290).", flag_values=fv)
    flags.DEFINE_float("level", None, "CT window centre in HU (default 120).", flag_values=fv)
    flags.DEFINE_list("percentiles", None, "Low,high percentiles for MRI normalisation (default 1,99).",
                      flag_values=fv)
    flags.DEFINE_string("label_map", None, "Label remapping 'src:dst,src:dst' (e.g. '5:255').", flag_values=fv)
    flags.DEFINE_string("label_default", None, "'keep' or an integer: what labels not in --label_map become "
                        "(0 stays 0).", flag_values=fv)
    flags.DEFINE_enum("label_order", None, list(LABEL_ORDERS), "Label resampling: nearest or label-aware linear.",
                      flag_values=fv)
    flags.DEFINE_float("mask_dilation_mm", None, "If set, zero the intensities outside the selected labels "
                       "dilated by this many mm (e.g. hide the skull).", flag_values=fv)


def define_output_flags(fv: flags.FlagValues, output_default: str | None = None) -> None:
    flags.DEFINE_string("output", output_default, "Dataset JSON to write; the HDF5 goes next to it.",
                        flag_values=fv)
    flags.DEFINE_string("h5", None, "HDF5 path (default: the JSON path with .h5).", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Replace an existing JSON/HDF5.", flag_values=fv)
    flags.DEFINE_bool("skip_bad", False, "Report and skip subjects that fail instead of stopping with an error.",
                      flag_values=fv)
    flags.DEFINE_bool("progress", True, "Show a progress bar.", flag_values=fv)


def define_import_nifti_flags(fv: flags.FlagValues) -> None:
    """Flags of ``python -m tools.import_nifti``."""
    define_preprocessing_flags(fv)
    define_output_flags(fv)
    flags.DEFINE_string("images", None, "Image files: a glob with one '{id}' placeholder (e.g. "
                        "'/data/img/{id}_ct.nii.gz'), or a plain glob (id = file name without .nii/.nii.gz).",
                        flag_values=fv)
    flags.DEFINE_string("labels", None, "Label maps: path pattern with '{id}' (glob characters allowed). Every "
                        "subject must have one.", flag_values=fv)
    flags.DEFINE_string("landmarks", None, "Landmark CSVs: path pattern with '{id}'. Subjects without a file get "
                        "no landmarks.", flag_values=fv)
    flags.DEFINE_enum("landmark_units", "voxel", ["voxel", "mm"], "Landmark CSV coordinates: voxel = 0-based "
                      "array indices i,j,k of the source NIfTI; mm = world RAS+ millimetres.", flag_values=fv)
    flags.DEFINE_string("image_type", None, "image_type of the descriptor (default: the recipe name, or "
                        "'generic').", flag_values=fv)
    flags.DEFINE_float("val_fraction", 0.1, "Fraction of subjects in subset 'val' (scheme 2).", flag_values=fv)
    flags.DEFINE_float("test_fraction", 0.0, "Fraction of subjects in subset 'test' (scheme 'test').",
                       flag_values=fv)
    flags.DEFINE_integer("split_seed", 0, "Seed of the train/val/test split.", flag_values=fv)
    flags.DEFINE_string("split_file", None, "JSON {subset: [ids]} giving the split instead of the fractions.",
                        flag_values=fv)
    flags.DEFINE_string("atlas", None, "Atlas (fixed image of every pair): a subject id (taken out of the "
                        "subsets) or a NIfTI path (preprocessed the same way, stored under key 'atlas').",
                        flag_values=fv)
    flags.DEFINE_string("atlas_labels", None, "Label map of a NIfTI atlas (stored as its segmentation).",
                        flag_values=fv)
    flags.DEFINE_string("atlas_mask", None, "Mask of a NIfTI atlas used only for cropping/masking.",
                        flag_values=fv)
    flags.DEFINE_string("label_names", None, "CSV naming the labels (columns Index and Name, like MUSE lists) for "
                        "segmentation_class_value.", flag_values=fv)


def define_import_ixi_flags(fv: flags.FlagValues, default_ixi_dir: str, default_mni_dir: str) -> None:
    """Flags of ``python -m tools.import_ixi``."""
    flags.DEFINE_string("data_dir", None, "Output folder (default: ldr_tf.data.dataset.default_data_dir()).",
                        flag_values=fv)
    flags.DEFINE_string("name", "brain", "Dataset name: writes <data_dir>/<name>.json and <name>.h5.",
                        flag_values=fv)
    flags.DEFINE_string("ixi_dir", default_ixi_dir, "IXI folder with t1/, dlmuse_seg/ and meta/.", flag_values=fv)
    flags.DEFINE_string("mni_dir", default_mni_dir, "MNI152 folder (for --atlas=mni).", flag_values=fv)
    flags.DEFINE_list("grid_size", ["64"], "Network grid D,H,W (one number = a cube); 64 for 2-core training, "
                      "128 possible.", flag_values=fv)
    flags.DEFINE_enum("atlas", "subject", ["subject", "mni", "none"], "Fixed image: a training subject (default), "
                      "the MNI152 template (no labels), or none: subject-to-subject pairs (every ordered pair of a "
                      "subset; --paired in evaluate/compare for neighbour pairs).", flag_values=fv)
    flags.DEFINE_string("atlas_id", None, "Atlas subject id (default: the first training subject of the seeded "
                        "split).", flag_values=fv)
    flags.DEFINE_list("split", ["110", "10", "30"], "Numbers of train,val,test subjects (must add up to the "
                      "number of subjects).", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of the split.", flag_values=fv)
    flags.DEFINE_list("subjects", None, "Only these subject ids (default: all).", flag_values=fv)
    flags.DEFINE_enum("skull", "crop", ["crop", "mask", "none", "head"], "crop: field of view = label bounding box "
                      "+ margin (brain fills the grid, skull kept around it); mask: crop and zero everything "
                      "outside the labels dilated by --mask_mm; none: whole scan fitted to the grid; head: "
                      "label-free, the head found from intensities, isotropic --spacing_mm voxels centred on it "
                      "(what predict repeats on a new scan; the labels are only scored).", flag_values=fv)
    flags.DEFINE_float("spacing_mm", None, "Grid voxel size in mm for --skull=head (default 256 mm / grid size: "
                       "2 mm at 128^3, 4 mm at 64^3).", flag_values=fv)
    flags.DEFINE_float("mask_mm", 4.0, "Dilation of the label mask for --skull=mask (mm).", flag_values=fv)
    flags.DEFINE_list("percentiles", ["1", "99"], "MRI normalisation percentiles.", flag_values=fv)
    flags.DEFINE_bool("overwrite", True, "Replace an existing dataset of the same name.", flag_values=fv)
    flags.DEFINE_bool("progress", True, "Show a progress bar.", flag_values=fv)


def define_import_ct_flags(fv: flags.FlagValues, default_ct_dir: str) -> None:
    """Flags of ``python -m tools.import_ct``."""
    flags.DEFINE_string("data_dir", None, "Output folder (default: ldr_tf.data.dataset.default_data_dir()).",
                        flag_values=fv)
    flags.DEFINE_string("name", "ct-smoke", "Dataset name: writes <data_dir>/<name>.json and <name>.h5.",
                        flag_values=fv)
    flags.DEFINE_string("ct_dir", default_ct_dir, "totalseg_ct folder.", flag_values=fv)
    flags.DEFINE_list("grid_size", ["64"], "Network grid D,H,W (one number = a cube; the original used 128).",
                      flag_values=fv)
    flags.DEFINE_integer("liver_label", 5, "Liver label in the TotalSegmentator maps.", flag_values=fv)
    flags.DEFINE_float("window", 290.0, "CT window width (HU).", flag_values=fv)
    flags.DEFINE_float("level", 120.0, "CT window centre (HU).", flag_values=fv)
    flags.DEFINE_bool("overwrite", True, "Replace an existing dataset of the same name.", flag_values=fv)
    flags.DEFINE_bool("progress", True, "Show a progress bar.", flag_values=fv)


def define_show_dataset_flags(fv: flags.FlagValues) -> None:
    """Flags of ``python -m tools.show_dataset``."""
    flags.DEFINE_string("dataset", None, "Dataset name (in --data_dir) or path to a dataset JSON.", flag_values=fv)
    flags.DEFINE_string("data_dir", None, "Folder of named datasets.", flag_values=fv)
    flags.DEFINE_string("out", None, "PNG to write.", flag_values=fv)
    flags.DEFINE_integer("subjects", 4, "How many subjects (the atlas first, if any).", flag_values=fv)
    flags.DEFINE_list("keys", None, "Subject keys to show instead of the first --subjects.", flag_values=fv)
    flags.DEFINE_string("subset", None, "Take subjects from this subset (default: all subsets in order).",
                        flag_values=fv)
    flags.DEFINE_bool("physical_aspect", True, "Draw voxels with their mm aspect ratio (from the 'spacing' attr).",
                      flag_values=fv)
    flags.DEFINE_integer("dpi", 110, "PNG resolution.", flag_values=fv)
