"""The Invariance tab's static ES modules and CSS, installed as ``tm_tensorboard.frontend`` (a package so
that they ship inside the installed distribution, editable or wheel)."""
