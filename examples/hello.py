"""Hello world: the HyperLoom README's first pipeline as a loomctl plan script.

    loomctl build examples/hello.py -o hello.loom
"""
from graphfmt import tasks

task1 = tasks.const("Hello ")        # a plain object
task2 = tasks.const("world!")        # a plain object
task3 = tasks.merge((task1, task2))  # merge two data objects together

results = [task3]
