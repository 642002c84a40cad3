"""FineTuningModule's fit path on a toy backbone: losses over both batch layouts, frozen BN, whitening state."""

from __future__ import annotations

import torch
from torch import nn

from hetretrieval.models.checkpoints import whitening_from_state
from hetretrieval.models.pooling.heads import GeM
from hetretrieval.models.whitening import Whitening
from hetretrieval.training.losses import ContrastiveLoss, TripletLoss
from hetretrieval.training.mining import TripletMiner
from hetretrieval.training.module import FineTuningModule


def _backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())


def test_training_step_takes_tuple_batches_and_mined_flat_batches():
    tuples = FineTuningModule(_backbone(), GeM(), loss=ContrastiveLoss()).train()
    images = torch.rand(2, 4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    loss = tuples.training_step({"images": images}, 0)
    # the tuple layout: the (2, 4) images described as one batch, then the loss over (query, positive, 2 negatives)
    descriptors = tuples.head(tuples.backbone(images.flatten(0, 1)))
    torch.testing.assert_close(descriptors.norm(dim=1), torch.ones(8))
    torch.testing.assert_close(loss, ContrastiveLoss()(descriptors.unflatten(0, (2, 4))))
    assert loss.requires_grad and loss > 0

    miner = TripletMiner("batch_hard")
    flat = FineTuningModule(_backbone(), GeM(), loss=TripletLoss(), miner=miner).train()
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    loss = flat.training_step({"images": images, "labels": labels}, 0)
    descriptors = flat.head(flat.backbone(images))
    torch.testing.assert_close(loss, TripletLoss()(descriptors, labels, miner(descriptors, labels)))
    loss.backward()
    assert flat.head.p.grad is not None and flat.backbone[0].weight.grad.abs().sum() > 0


def test_frozen_batchnorm_keeps_its_statistics():
    module = FineTuningModule(_backbone(), GeM(), freeze_batchnorm=True).train()
    batchnorm = module.backbone[1]
    assert module.training and module.backbone[0].training and not batchnorm.training
    before = batchnorm.running_mean.clone()
    module.describe_for_training(torch.rand(4, 3, 16, 16))
    torch.testing.assert_close(batchnorm.running_mean, before)
    assert FineTuningModule(_backbone(), GeM()).train().backbone[1].training
    fresh = FineTuningModule(_backbone(), GeM(), freeze_batchnorm=True)  # never put in train mode by the caller
    fresh.trainer = None
    fresh.on_train_epoch_start()
    assert not fresh.backbone[1].training


def test_whitening_is_the_last_layer_and_rebuilt_from_a_state_dict():
    whitening = Whitening(torch.zeros(8), torch.eye(8)[:3])
    module = FineTuningModule(_backbone(), GeM(), whitening=whitening).eval()
    images = torch.rand(2, 3, 16, 16)
    descriptors = module.describe_for_training(images)
    assert descriptors.shape == (2, 3) and module.descriptor_name == "gem+whitening"
    torch.testing.assert_close(module.engine().network(images)["gem"], descriptors)  # evaluation describes alike
    rebuilt = whitening_from_state(module.state_dict())
    rebuilt.load_state_dict(whitening.state_dict())
    assert (rebuilt.in_features, rebuilt.out_features) == (8, 3)
    assert whitening_from_state(FineTuningModule(_backbone(), GeM()).state_dict()) is None
