"""The A-SDM engine: plain torch over the host's UNet classes, in the paper's vocabulary."""
