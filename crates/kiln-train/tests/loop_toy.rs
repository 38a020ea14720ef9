//! kiln's loop as a library, on a task kiln does not ship: a small Burn classifier with its own
//! batch type, loss and accuracy metric, fed from a burn-dataset `InMemDataset` through a burn
//! `Batcher`. Asserts the loop's promises directly, not through the CLI: the deferred loss is
//! exact (one read per window, the mean of every step's loss), a stopped and resumed run ends
//! bit-identical to an unbroken one, and each `train.on_nan` mode does what it says.

use std::sync::{Arc, Mutex};

use burn::backend::{Autodiff, Flex};
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::InMemDataset;
use burn::module::{Module, ModuleVisitor};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::{log_softmax, relu};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use kiln_events::{Control, Event, EventSink, Summary, WindowRow};
use kiln_recipe::{OnNan, TrainSection};
use kiln_train::step::Faults;
use kiln_train::{BatchStats, Batching, DatasetData, EvalFigures, MetricDef, Per, Split, Task, TaskBatch, TaskOutput, Trainer, ValidModel};

type B = Autodiff<Flex>;

#[derive(Module, Debug)]
struct Classifier<B: Backend> {
    hidden: Linear<B>,
    out: Linear<B>,
}

impl<B: Backend> Classifier<B> {
    fn new(device: &B::Device) -> Self {
        Self { hidden: LinearConfig::new(4, 16).init(device), out: LinearConfig::new(16, 3).init(device) }
    }

    fn logits(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.out.forward(relu(self.hidden.forward(x)))
    }
}

#[derive(Clone, Debug)]
struct Point {
    x: [f32; 4],
    class: i64,
}

/// Three classes by which feature is largest, from a fixed formula (no RNG: the same points in
/// every test).
fn points(n: usize, offset: usize) -> Vec<Point> {
    (0..n)
        .map(|i| {
            let k = (i + offset) as f32;
            let x = [(k * 0.37).sin(), (k * 0.71).cos(), (k * 1.13).sin() * 0.9, (k * 0.23).cos() * 0.5];
            let class = (0..3).max_by(|&a, &b| x[a].total_cmp(&x[b])).unwrap() as i64;
            Point { x, class }
        })
        .collect()
}

#[derive(Clone, Debug)]
struct PointBatch<B: Backend> {
    x: Tensor<B, 2>,
    y: Tensor<B, 1, Int>,
    rows: usize,
}

impl<B: Backend> TaskBatch<B> for PointBatch<B> {
    fn stats(&self) -> BatchStats {
        BatchStats { size: self.rows, target_tokens: self.rows, real_tokens: self.rows, slots: self.rows }
    }

    fn to_device(self, device: &B::Device) -> Self {
        Self { x: self.x.to_device(device), y: self.y.to_device(device), rows: self.rows }
    }
}

#[derive(Clone)]
struct PointBatcher;

impl<B: Backend> Batcher<B, Point, PointBatch<B>> for PointBatcher {
    fn batch(&self, items: Vec<Point>, device: &B::Device) -> PointBatch<B> {
        let rows = items.len();
        let x: Vec<f32> = items.iter().flat_map(|p| p.x).collect();
        let y: Vec<i64> = items.iter().map(|p| p.class).collect();
        PointBatch { x: Tensor::from_data(TensorData::new(x, [rows, 4]), device), y: Tensor::from_data(TensorData::new(y, [rows]), device), rows }
    }
}

/// Summed cross-entropy and the number of correct predictions.
fn sums<B: Backend>(model: &Classifier<B>, b: &PointBatch<B>) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let logits = model.logits(b.x.clone());
    let picked = log_softmax(logits.clone(), 1).gather(1, b.y.clone().unsqueeze_dim(1));
    let correct = logits.argmax(1).squeeze_dim::<1>(1).equal(b.y.clone()).float().sum();
    (picked.sum().neg(), correct)
}

struct PointTask {
    valid: Vec<Point>,
}

impl<B: AutodiffBackend> Task<B> for PointTask {
    type Model = Classifier<B>;
    type Batch = PointBatch<B>;

    fn forward(&self, model: &Classifier<B>, batch: &PointBatch<B>) -> TaskOutput<B> {
        let (loss, correct) = sums(model, batch);
        TaskOutput::loss(loss).with_metric(correct)
    }

    fn metrics(&self) -> Vec<MetricDef> {
        vec![MetricDef { name: "accuracy", per: Per::Row }]
    }

    fn evaluate(&self, model: &ValidModel<B, Self>, split: Split, device: &B::Device) -> Option<EvalFigures> {
        if split == Split::Test {
            return None;
        }
        let b: PointBatch<B::InnerBackend> = PointBatcher.batch(self.valid.clone(), device);
        let (loss, correct) = sums(model, &b);
        let n = self.valid.len() as f64;
        let read = |t: Tensor<B::InnerBackend, 1>| t.into_data().iter::<f64>().next().unwrap();
        Some(kiln_train::task::figures(read(loss) / n, [("accuracy".to_string(), read(correct) / n)].into()))
    }
}

type Data = DatasetData<B, Point, PointBatch<B>, InMemDataset<Point>, PointBatcher>;

fn data() -> Data {
    DatasetData::new(InMemDataset::new(points(96, 0)), PointBatcher, |_| 1, Batching { max_tokens: 8, max_items: 0, bucket_pool: 4, seed: 5 })
}

/// Collects the events; with `stop_after`, asks the loop to stop once a window reaches that step.
#[derive(Clone, Default)]
struct Events {
    seen: Arc<Mutex<Vec<Event>>>,
    stop_after: Option<(usize, Control)>,
}

impl EventSink for Events {
    fn emit(&mut self, event: &Event) -> Result<(), String> {
        if let (Event::Window(w), Some((step, control))) = (event, &self.stop_after) {
            if w.step >= *step {
                control.request_stop();
            }
        }
        self.seen.lock().unwrap().push(event.clone());
        Ok(())
    }
}

impl Events {
    fn windows(&self) -> Vec<WindowRow> {
        self.seen.lock().unwrap().iter().filter_map(|e| if let Event::Window(w) = e { Some(w.clone()) } else { None }).collect()
    }
}

fn settings(sync_interval: usize) -> TrainSection {
    TrainSection { epochs: 3, lr: 0.01, warmup_steps: 4, sync_interval, label_smoothing: 0.0, keep_checkpoints: 0, ..Default::default() }
}

fn trainer(run_dir: &std::path::Path, train: TrainSection) -> Trainer<B, PointTask> {
    let device = Default::default();
    Trainer::new(PointTask { valid: points(48, 1000) }, Classifier::new(&device), device).settings(train).run_dir(run_dir).loader(2, 4)
}

/// Every weight of the run's latest checkpoint, as bits (parameter ids aside).
fn weights(run_dir: &std::path::Path) -> Vec<u32> {
    struct Values(Vec<u32>);
    impl<B: Backend> ModuleVisitor<B> for Values {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            self.0.extend(param.val().into_data().iter::<f32>().map(f32::to_bits));
        }
    }
    let latest = kiln_train::checkpoint::latest(run_dir).unwrap().expect("a checkpoint");
    let model = kiln_train::checkpoint::load_weights(Classifier::<Flex>::new(&Default::default()), &latest.join("model"), &Default::default()).unwrap();
    let mut values = Values(Vec::new());
    model.visit(&mut values);
    values.0
}

/// The backend's RNG is one per process: runs in one test binary take turns.
static ONE_RUN_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_RUN_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn fit(run_dir: &std::path::Path, train: TrainSection, events: &mut Events) -> Summary {
    trainer(run_dir, train).fit(&data(), events).unwrap()
}

/// Every step's loss counts, exactly: a window of 4 steps logs the unit-weighted mean of the
/// losses its 4 steps log one by one (sync every step), the runs end with the same weights, and
/// the reads number steps / N plus one per epoch end.
#[test]
fn deferred_loss_is_every_steps_loss_with_one_read_per_window() {
    let _turn = one_at_a_time();
    let (one, four) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (mut each, mut windowed) = (Events::default(), Events::default());
    let a = fit(one.path(), settings(1), &mut each);
    let b = fit(four.path(), settings(4), &mut windowed);
    let steps = each.windows();
    assert_eq!(steps.len(), a.steps, "sync every step: one window per step");
    let per_epoch = a.steps / 3;
    assert_eq!(a.steps, 3 * per_epoch);
    // 12 batches of 8 an epoch: windows of 4 steps, 3 an epoch, no partial window.
    assert_eq!(b.sync.count as usize, 3 * per_epoch.div_ceil(4), "one read per window of 4 (and at each epoch end)");
    assert_eq!(a.sync.count as usize, a.steps);
    for w in windowed.windows() {
        let mine: Vec<&WindowRow> = steps.iter().filter(|s| s.step > w.step - w.steps && s.step <= w.step).collect();
        assert_eq!(mine.len(), w.steps);
        let tokens: u64 = mine.iter().map(|s| s.tokens).sum();
        let mean = mine.iter().map(|s| s.loss * s.tokens as f64).sum::<f64>() / tokens as f64;
        assert_eq!(tokens, w.tokens);
        assert!((mean - w.loss).abs() <= 1e-6 * mean.abs().max(1.0), "window to step {}: {} vs the steps' {mean}", w.step, w.loss);
        let accuracy = mine.iter().map(|s| s.metrics["accuracy"] * s.sentences as f64).sum::<f64>() / w.sentences as f64;
        assert!((accuracy - w.metrics["accuracy"]).abs() < 1e-9, "the task's metric is summed like the loss");
    }
    assert!((a.train_loss - b.train_loss).abs() <= 1e-6, "{} vs {}", a.train_loss, b.train_loss);
    assert_eq!(weights(one.path()), weights(four.path()), "the reads change nothing the model sees");
    assert!(b.metrics["accuracy"] > 0.5, "it learned something: {:?}", b.metrics);
}

/// A run stopped mid-epoch (as `q` or SIGINT stop one) and resumed from its checkpoint ends with
/// the weights, loss sums and step count of an unbroken run.
#[test]
fn stopped_and_resumed_run_ends_bit_identical_to_an_unbroken_one() {
    let _turn = one_at_a_time();
    let (whole, broken) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let unbroken = fit(whole.path(), settings(3), &mut Events::default());
    let control = Control::new();
    let mut stopping = Events { stop_after: Some((17, control.clone())), ..Default::default() };
    let first = trainer(broken.path(), settings(3)).control(control).fit(&data(), &mut stopping).unwrap();
    assert!(first.stopped && first.steps < unbroken.steps, "stopped at step {} of {}", first.steps, unbroken.steps);
    let checkpoint = kiln_train::checkpoint::latest(broken.path()).unwrap().unwrap();
    let mut resumed_events = Events::default();
    let resumed = trainer(broken.path(), settings(3)).resume(Some(checkpoint)).fit(&data(), &mut resumed_events).unwrap();
    assert!(!resumed.stopped);
    assert_eq!(resumed.steps, unbroken.steps);
    assert_eq!(resumed.train_loss.to_bits(), unbroken.train_loss.to_bits(), "the last epoch's loss sums carry over exactly");
    assert_eq!(weights(broken.path()), weights(whole.path()));
    assert_eq!(resumed.valid_loss.map(f64::to_bits), unbroken.valid_loss.map(f64::to_bits));
}

/// `on_nan`: stop ends the run with the diagnosis; skip drops the step and goes on; rollback
/// goes back to the last checkpoint with a lower learning rate. Step 7 is made NaN every time
/// it runs, so a replayed or rolled-back run meets it again.
#[test]
fn each_on_nan_mode_does_what_it_says() {
    let _turn = one_at_a_time();
    let faults = Faults { nonfinite_steps: vec![7], ..Default::default() };
    let run = |mode: OnNan| {
        let dir = tempfile::tempdir().unwrap();
        let train = TrainSection { on_nan: mode, save_every_steps: 4, ..settings(3) };
        let result = trainer(dir.path(), train).inject_faults(faults.clone()).fit(&data(), &mut Events::default());
        (dir, result)
    };
    let (dir, stopped) = run(OnNan::Stop);
    let err = stopped.expect_err("stop ends the run");
    assert!(err.downcast_ref::<kiln_train::trainer::NonFiniteStop>().is_some(), "{err}");
    assert!(err.to_string().contains("at step 7"), "{err}");
    let diagnosis: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("nonfinite.json")).unwrap()).unwrap();
    assert_eq!(diagnosis["first_nonfinite_step"], 7);

    let (_dir, skipped) = run(OnNan::Skip);
    let skipped = skipped.unwrap();
    // Once per epoch: each epoch's step 7 is the faulty one only in epoch 1 (steps count on).
    assert_eq!((skipped.skipped_steps, skipped.rollbacks), (1, 0));
    assert!(skipped.train_loss.is_finite() && skipped.valid_loss.unwrap().is_finite());

    // Rolled back to step 4, step 7 is NaN again: rollbacks until nan_max_recoveries, then a stop.
    let (_dir, rolled) = run(OnNan::Rollback);
    let err = rolled.expect_err("the fault comes back every time");
    assert!(err.to_string().contains("rollbacks made already"), "{err}");
}

/// The weights of a checkpoint file (`model` or `ema`) of the run's latest checkpoint, as bits.
fn file_weights(run_dir: &std::path::Path, file: &str) -> Vec<u32> {
    struct Values(Vec<u32>);
    impl<B: Backend> ModuleVisitor<B> for Values {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            self.0.extend(param.val().into_data().iter::<f32>().map(f32::to_bits));
        }
    }
    let latest = kiln_train::checkpoint::latest(run_dir).unwrap().expect("a checkpoint");
    let model = kiln_train::checkpoint::load_weights(Classifier::<Flex>::new(&Default::default()), &latest.join(file), &Default::default()).unwrap();
    let mut values = Values(Vec::new());
    model.visit(&mut values);
    values.0
}

/// `train.ema_decay`: the moving average is saved beside the raw weights, a stopped and resumed
/// run ends with the unbroken run's average bit for bit, and validation measures the average.
#[test]
fn weight_average_resumes_bit_identical_and_is_what_validation_measures() {
    let _turn = one_at_a_time();
    let train = TrainSection { ema_decay: 0.9, ..settings(3) };
    let (whole, broken) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let unbroken = fit(whole.path(), train.clone(), &mut Events::default());
    assert!(unbroken.ema);
    let control = Control::new();
    let mut stopping = Events { stop_after: Some((17, control.clone())), ..Default::default() };
    let first = trainer(broken.path(), train.clone()).control(control).fit(&data(), &mut stopping).unwrap();
    assert!(first.stopped && first.steps < unbroken.steps);
    let checkpoint = kiln_train::checkpoint::latest(broken.path()).unwrap().unwrap();
    let resumed = trainer(broken.path(), train).resume(Some(checkpoint)).fit(&data(), &mut Events::default()).unwrap();
    assert_eq!(resumed.steps, unbroken.steps);
    assert_eq!(file_weights(broken.path(), "ema"), file_weights(whole.path(), "ema"), "the average continues exactly");
    assert_eq!(file_weights(broken.path(), "model"), file_weights(whole.path(), "model"));
    assert_ne!(file_weights(whole.path(), "ema"), file_weights(whole.path(), "model"), "the average is not the last weights");
    // The logged validation is the saved average's.
    let latest = kiln_train::checkpoint::latest(whole.path()).unwrap().unwrap();
    let device = Default::default();
    let ema = kiln_train::checkpoint::load_weights(Classifier::<Flex>::new(&device), &latest.join("ema"), &device).unwrap();
    let figures = <PointTask as Task<B>>::evaluate(&PointTask { valid: points(48, 1000) }, &ema, Split::Valid, &device).unwrap();
    assert_eq!(Some(figures.loss.to_bits()), unbroken.valid_loss.map(f64::to_bits));
    assert_eq!(resumed.valid_loss.map(f64::to_bits), unbroken.valid_loss.map(f64::to_bits));
}

/// A task whose validation losses follow a script (from validation `from` on): early stopping is
/// then a matter of counting.
struct ScriptedValidation {
    inner: PointTask,
    losses: Vec<f64>,
    at: std::sync::atomic::AtomicUsize,
}

impl<B: AutodiffBackend> Task<B> for ScriptedValidation {
    type Model = Classifier<B>;
    type Batch = PointBatch<B>;

    fn forward(&self, model: &Classifier<B>, batch: &PointBatch<B>) -> TaskOutput<B> {
        <PointTask as Task<B>>::forward(&self.inner, model, batch)
    }

    fn evaluate(&self, _: &ValidModel<B, Self>, split: Split, _: &B::Device) -> Option<EvalFigures> {
        (split == Split::Valid).then(|| kiln_train::task::figures(self.losses[self.at.fetch_add(1, std::sync::atomic::Ordering::SeqCst)], Default::default()))
    }
}

fn scripted(run_dir: &std::path::Path, train: TrainSection, from: usize) -> Trainer<B, ScriptedValidation> {
    let device = Default::default();
    let task = ScriptedValidation { inner: PointTask { valid: Vec::new() }, losses: vec![1.0, 0.8, 0.9, 0.85, 0.81, 0.2, 0.1, 0.05, 0.04, 0.03], at: from.into() };
    Trainer::new(task, Classifier::new(&device), device).settings(train).run_dir(run_dir).loader(2, 4)
}

/// `train.patience = 3`: validation 2 is the best, 3-5 are not better, so the run ends after
/// epoch 5 of 10 with validation 2's checkpoint as the best; a run stopped in epoch 4 and resumed
/// carries its count of validations without improvement and ends at the same validation.
#[test]
fn early_stopping_stops_at_the_right_validation_and_resumes_its_count() {
    let _turn = one_at_a_time();
    let train = TrainSection { epochs: 10, patience: 3, ..settings(3) };
    let dir = tempfile::tempdir().unwrap();
    let whole = scripted(dir.path(), train.clone(), 0).fit(&data(), &mut Events::default()).unwrap();
    let per_epoch = 12;
    assert!(whole.early_stopped);
    assert_eq!((whole.epochs, whole.steps), (5, 5 * per_epoch), "stopped after the fifth validation");
    let best = whole.best.clone().expect("a best checkpoint");
    assert_eq!((best.checkpoint.as_str(), best.value), ("step-0000024", 0.8));
    let pointer = std::fs::read_to_string(dir.path().join("checkpoints/best")).unwrap();
    assert_eq!(pointer.trim(), "step-0000024");
    assert!(dir.path().join("checkpoints/step-0000024").is_dir(), "the best checkpoint is kept");

    // Stopped in epoch 4, after three validations (one without improvement), then resumed.
    let broken = tempfile::tempdir().unwrap();
    let control = Control::new();
    let mut stopping = Events { stop_after: Some((40, control.clone())), ..Default::default() };
    let first = scripted(broken.path(), train.clone(), 0).control(control).fit(&data(), &mut stopping).unwrap();
    assert!(first.stopped && !first.early_stopped && first.epochs == 3, "stopped in epoch 4: {} epochs, step {}", first.epochs, first.steps);
    let checkpoint = kiln_train::checkpoint::latest(broken.path()).unwrap().unwrap();
    let resumed = scripted(broken.path(), train.clone(), 3).resume(Some(checkpoint)).fit(&data(), &mut Events::default()).unwrap();
    assert!(resumed.early_stopped);
    assert_eq!((resumed.epochs, resumed.steps), (5, 5 * per_epoch));
    assert_eq!(resumed.best.map(|b| b.checkpoint), Some("step-0000024".to_string()));
    // Resuming an early-stopped run trains nothing more.
    let checkpoint = kiln_train::checkpoint::latest(broken.path()).unwrap().unwrap();
    let again = scripted(broken.path(), train, 5).resume(Some(checkpoint)).fit(&data(), &mut Events::default()).unwrap();
    assert_eq!(again.steps, 5 * per_epoch);
}
