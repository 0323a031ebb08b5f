"""The shapes world: a GenEval-style world of coloured shapes on 32×32 images, cheap enough for the CPU.

* :mod:`~harness.shapes_world.world`: vocabulary, palette and the GenEval prompt grammar;
* :mod:`~harness.shapes_world.render`: metadata → a ground-truth image;
* :mod:`~harness.shapes_world.detect`: the rule-based detector (image → GenEval detections);
* :mod:`~harness.shapes_world.judge`: detector + GenEval rules on a batch of images.

They sit in the core because the shapes benchmark (prompts, metric) and the shapes rewards (the rule
judge, the differentiable proxy) share them and must not import each other.
"""
