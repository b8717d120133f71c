"""A throwaway third-party plugin implementing every hook, registered at runtime and seen in use."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

import coformer
from coformer import hookimpl
from coformer.offline.booster import BoosterConfig, calibrate
from coformer.data import DatasetSource, LabelledExamples, TensorDataset
from coformer.offline.decompose import proportional_specs
from coformer.offline.evaluator import Evaluator
from coformer.offline.search import SearchStrategy
from coformer.spec import DeviceProfile
from coformer_backbones.bert import BertBackbone
from coformer_transports.inprocess import InProcessClient


class TinyBert(BertBackbone):
    """A 'new backbone' for the test: BERT whose default model is the tiny random one."""

    def load(self, source=None, *, num_labels=None, **options):
        return self.tiny(num_labels=num_labels or 3)


class LoopClient(InProcessClient):
    """A 'new transport' for the scheme loop://, backed by in-process workers."""

    def __init__(self, uri: str):
        super().__init__(uri.replace("loop://", "inproc://loop-", 1))


class OneShot(SearchStrategy):
    """A 'new search strategy': evaluate the first feasible random proposal."""

    name = "one_shot"

    def search(self, evaluator, trials, *, on_trial=None):
        enc = self.encoding(evaluator)
        rng = random.Random(self.seed)
        records = []
        while not any(r.feasible for r in records):
            self.run_trial(evaluator, enc, enc.sample(rng), records)
        return self.result(evaluator, records)


@dataclass(kw_only=True)
class ThreeTopics(DatasetSource):
    """A 'new data set': short texts on three topics, ``per_class`` of each."""

    per_class: int = 10

    def read(self) -> LabelledExamples:
        """Every text once; no fixed splits."""
        topics = ["weather", "football", "cooking"]
        texts = [f"{t} note {i}" for t in topics for i in range(self.per_class)]
        return LabelledExamples(topics, texts, [y for y in range(3) for _ in range(self.per_class)])


class Recorder:
    """Implements every hook spec; the notification hooks record what they saw."""

    def __init__(self):
        self.events: list[tuple] = []

    @hookimpl
    def register_backbones(self, register):
        register("tinybert", TinyBert)

    @hookimpl
    def register_aggregators(self, register):
        register("first_present", lambda **kw: FirstPresent(**kw))

    @hookimpl
    def register_search_strategies(self, register):
        register("one_shot", OneShot)

    @hookimpl
    def register_transports(self, register):
        register("loop", LoopClient)

    @hookimpl
    def register_datasets(self, register):
        register("three_topics", ThreeTopics)

    @hookimpl
    def register_commands(self, cli):
        @cli.command("recorder-ping")
        def ping():
            print("pong")

    @hookimpl
    def search_trial_started(self, strategy, trial, policy):
        self.events.append(("started", strategy, trial, len(policy.specs)))

    @hookimpl
    def search_trial_finished(self, strategy, trial, policy, result):
        self.events.append(("finished", strategy, trial, result.feasible))

    @hookimpl
    def calibration_step(self, submodel, epoch, step, loss):
        self.events.append(("step", submodel, epoch, step))

    @hookimpl
    def calibration_finished(self, submodel, sample_weights):
        self.events.append(("calibrated", submodel, float(sample_weights.sum())))


from coformer.aggregator import Aggregator  # noqa: E402


class FirstPresent(Aggregator):
    """Logits of the first sub-model that answered (through its student head)."""

    name = "first_present"
    trainable = False

    def __init__(self, feature_dims, embed_dim, task_head, student_heads=None, **options):
        super().__init__(feature_dims, embed_dim, task_head, student_heads, **options)
        self.heads = torch.nn.ModuleList(student_heads)

    def forward(self, features):
        i = self.present(features)[0]
        return self.heads[i](features[i])


@pytest.fixture
def recorder():
    rec = Recorder()
    name = coformer.register_plugin(rec, name="recorder")
    yield rec
    coformer.unregister_plugin(name)


def test_every_hook_of_a_runtime_plugin_is_used(recorder):
    backbone = coformer.create_backbone("tinybert")
    teacher = backbone.load(num_labels=3)
    data = coformer.load_dataset("three_topics?per_class=12&max_size=20")  # the plugin's data set, by URI
    assert data.classes == ["weather", "football", "cooking"] and data.name == "three_topics?max_size=20&per_class=12"
    batch = backbone.prepare(teacher, data.train.examples[:8])
    val = TensorDataset(batch, torch.tensor(data.train.labels[:8]))
    devices = [DeviceProfile("a", 1, 10, 5), DeviceProfile("b", 1, 20, 5)]

    # search strategy + trial notifications
    evaluator = Evaluator(backbone, teacher, devices, val=val)
    result = coformer.create_search_strategy("one_shot").search(evaluator, trials=1)
    trials = [e for e in recorder.events if e[0] in ("started", "finished")]
    assert trials == [("started", "one_shot", result.trials[-1].index, 2),
                      ("finished", "one_shot", result.trials[-1].index, True)]

    # calibration notifications
    specs = proportional_specs(backbone.shape(teacher), [1, 2])
    subs = backbone.decompose(teacher, specs, batch=batch)
    cal = calibrate(backbone, teacher, subs, val, config=BoosterConfig(epochs=1, batch_size=4), on_progress=False)
    steps = [e for e in recorder.events if e[0] == "step"]
    assert [s[1] for s in steps] == [0, 0, 1, 1] and [s[3] for s in steps] == [1, 2, 1, 2]
    done = [e for e in recorder.events if e[0] == "calibrated"]
    assert [d[1] for d in done] == [0, 1] and all(d[2] == pytest.approx(1.0) for d in done)

    # transport by scheme + aggregator from the same plugin, through the runtime
    from coformer.artifacts import submodel_artifact
    from coformer.online.coordinator import Coordinator

    agg = coformer.create_aggregator("first_present", feature_dims=[m.feature_dim for m in subs],
                                     embed_dim=32, task_head=backbone.task_head(teacher),
                                     student_heads=cal.student_heads)
    clients = [coformer.open_transport(f"loop://dev{i}") for i in range(2)]
    assert all(isinstance(c, LoopClient) for c in clients)
    coord = Coordinator.deploy(clients, [submodel_artifact(m) for m in subs], agg)
    answer = coord.infer(batch)
    with torch.inference_mode():
        expected = cal.student_heads[0](subs[0](**batch).half().float())
    torch.testing.assert_close(answer.logits, expected)
    coord.close()


def test_plugin_command_is_added_to_the_cli(recorder, capsys):
    from coformer.cli import build_cli

    with pytest.raises(SystemExit) as code:
        build_cli()(args=["recorder-ping"], prog_name="coformer")
    assert code.value.code == 0 and "pong" in capsys.readouterr().out
