"""Publishing compression-ready checkpoints to the Hugging Face Hub: `kvtrain publish` checks a checkpoint
(`kvtrain.hub.validate`), writes its model card (`kvtrain.hub.card`) and uploads it, card last
(`kvtrain.hub.publish`). Loading one back is `kvtrain.from_pretrained` (`kvtrain.runtime.pretrained`)."""
