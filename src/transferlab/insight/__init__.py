"""Looking inside a network: feature maps, ideal-class images and adversarial attacks, all in pixel space."""
