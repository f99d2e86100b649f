"""MDM transforms: batched corruptions and pretraining objectives (training/feature extraction), MONAI array/dict
transforms, label loaders, the nucleus boundary target and nucleus instances."""

from monai_mdm.transforms import array, corruption, dictionary, objectives
from monai_mdm.transforms.array import (
    INSTANCE_METHODS,
    NUCLEUS_CLASSES,
    EnsureRGB,
    NucleusBoundaryTarget,
    NucleusInstances,
    RandPatchMask,
    check_instance_method,
    nucleus_instances,
)
from monai_mdm.transforms.corruption import (
    Corruption,
    GaussianNoise,
    PatchMasking,
    feature_corruption,
    guided_diffusion_linear_betas,
    patch_grid_shape,
    patch_keep_mask,
    random_patch_keep,
)
from monai_mdm.transforms.objectives import (
    OBJECTIVES,
    DDPMObjective,
    DiffMAEObjective,
    FeatureReading,
    MAEObjective,
    MDMObjective,
    Objective,
    ObjectiveBatch,
    UMDObjective,
    objective,
    objective_from_record,
)
from monai_mdm.transforms.dictionary import (
    EnsureRGBD,
    EnsureRGBd,
    EnsureRGBDict,
    LoadClassMapD,
    LoadClassMapd,
    LoadClassMapDict,
    LoadInstanceMaskD,
    LoadInstanceMaskd,
    LoadInstanceMaskDict,
    NucleusBoundaryTargetD,
    NucleusBoundaryTargetd,
    NucleusBoundaryTargetDict,
    NucleusInstancesD,
    NucleusInstancesd,
    NucleusInstancesDict,
    RandPatchMaskD,
    RandPatchMaskd,
    RandPatchMaskDict,
)

__all__ = [*array.__all__, *corruption.__all__, *objectives.__all__, *dictionary.__all__]
