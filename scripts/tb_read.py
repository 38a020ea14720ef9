#!/usr/bin/env python3
"""Prints a run's TensorBoard files as TensorBoard's own reader loads them (EventAccumulator, with
restarts purging what they purge), as JSON: {"scalars": {tag: [[step, value], ...]},
"texts": {tag: [[step, text], ...]}, "hparams": {name: value}} (the hparams plugin's
session_start_info, parsed with the plugin's own protobuf). kiln's tests compare it with
metrics.jsonl. Usage: tb_read.py RUN_DIR/tb"""

import json
import sys

from google.protobuf import json_format
from tensorboard.backend.event_processing.event_accumulator import SCALARS, TENSORS, EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

HPARAMS_TAG = "_hparams_/session_start_info"


def main():
    acc = EventAccumulator(sys.argv[1], size_guidance={SCALARS: 0, TENSORS: 0}, purge_orphaned_data=True)
    acc.Reload()
    tags = acc.Tags()
    scalars = {tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in tags["scalars"]}
    texts, hparams = {}, {}
    for tag in tags["tensors"]:
        plugin = acc.SummaryMetadata(tag).plugin_data
        if plugin.plugin_name == "text":
            texts[tag] = [[e.step, e.tensor_proto.string_val[0].decode()] for e in acc.Tensors(tag)]
        elif tag == HPARAMS_TAG and plugin.plugin_name == "hparams":
            data = plugin_data_pb2.HParamsPluginData.FromString(plugin.content)
            hparams = json_format.MessageToDict(data.session_start_info).get("hparams", {})
    json.dump({"scalars": scalars, "texts": texts, "hparams": hparams}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
