//! `kiln serve` on a real (small) run, over loopback: answers equal to `kiln translate` (greedy
//! and n-best beam, scores included), concurrent clients each get their own answers, shared
//! batches form, a matrix of malformed requests each refused with a JSON 4xx while the server
//! keeps answering, and SIGTERM drains a request in flight and exits 0.

mod common;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const INPUT: [&str; 5] = ["Ich gehe nach Hause.", "Das Wetter ist heute schön.", "", "Wo ist der Bahnhof?", "Er hat das Buch gelesen, das ich ihm gegeben habe."];

struct Server {
    child: Child,
    address: String,
    stdout: BufReader<ChildStdout>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(run: &str, flags: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["serve", run, "--port", "0"])
        .args(flags)
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let address = line.split("http://").nth(1).and_then(|rest| rest.split_whitespace().next()).unwrap_or_else(|| panic!("no address in {line:?}")).to_string();
    Server { child, address, stdout }
}

/// One raw request on its own connection; the status and the body as JSON (`Null` if none).
fn exchange(address: &str, raw: &[u8]) -> (u16, Value) {
    let (status, body) = kiln_serve::client::exchange(address, raw).unwrap();
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn post(address: &str, path: &str, body: &[u8]) -> (u16, Value) {
    let (status, body) = kiln_serve::client::request(address, "POST", path, body).unwrap();
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn get(address: &str, path: &str) -> (u16, Value) {
    let (status, body) = kiln_serve::client::request(address, "GET", path, b"").unwrap();
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn translate(address: &str, request: &Value) -> Value {
    let (status, body) = post(address, "/translate", request.to_string().as_bytes());
    assert_eq!(status, 200, "{request}: {body}");
    body
}

/// `kiln translate` of the lines: (text, score) per hypothesis, grouped by line.
fn cli_n_best(run: &str, lines: &[&str], beam: usize, n: usize) -> Vec<Vec<(String, f64)>> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["translate", run, "--beam", &beam.to_string(), "--n-best", &n.to_string()])
        .current_dir(root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(lines.join("\n").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let mut grouped = vec![Vec::new(); lines.len()];
    for l in String::from_utf8(out.stdout).unwrap().lines() {
        let f: Vec<&str> = l.split(" ||| ").collect();
        grouped[f[0].parse::<usize>().unwrap()].push((f[1].to_string(), f[2].parse().unwrap()));
    }
    grouped
}

fn assert_same(served: &Value, cli: &[Vec<(String, f64)>], n: usize) {
    let translations = served["translations"].as_array().unwrap();
    assert_eq!(translations.len(), cli.len());
    for (t, want) in translations.iter().zip(cli) {
        assert_eq!(t["text"].as_str().unwrap(), want[0].0);
        // The command line prints 6 decimals; batches of other shapes may move the last bits.
        assert!((t["score"].as_f64().unwrap() - want[0].1).abs() < 1e-4, "{t} vs {want:?}");
        // A log-probability of real tokens (a banned token, such as padding, would be about -1e9).
        assert!(t["score"].as_f64().unwrap() > -1e4, "{t}");
        if n > 1 && !want[0].0.is_empty() {
            let hyps: Vec<(String, f64)> = t["n_best"].as_array().unwrap().iter().map(|h| (h["text"].as_str().unwrap().to_string(), h["score"].as_f64().unwrap())).collect();
            assert_eq!(hyps.iter().map(|h| &h.0).collect::<Vec<_>>(), want.iter().map(|h| &h.0).collect::<Vec<_>>());
        }
    }
}

#[test]
fn serve_answers_as_translate_does_and_outlives_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run").display().to_string();
    let o = kiln(&["train", &smoke(), "--run-dir", &run, "--no-tui", "--set", "train.epochs=1", "--set", "eval.bleu=false"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let server = start(&run, &[]);
    let a = server.address.as_str();

    // The same translations and scores as the command line, greedy and 2-best of beam 3.
    let served = translate(a, &json!({ "src": INPUT, "id": "first" }));
    assert_eq!(served["id"], "first");
    assert_same(&served, &cli_n_best(&run, &INPUT, 1, 1), 1);
    assert_eq!(served["translations"][2]["text"], "", "an empty line stays empty");
    let served = translate(a, &json!({ "src": INPUT, "beam": 3, "n_best": 2 }));
    assert_same(&served, &cli_n_best(&run, &INPUT, 3, 2), 2);
    let plain = Command::new(env!("CARGO_BIN_EXE_kiln")).args(["translate", &run, "--input", &write_lines(dir.path(), &INPUT)]).current_dir(root()).output().unwrap();
    let served = translate(a, &json!({ "src": INPUT }));
    let texts: Vec<&str> = served["translations"].as_array().unwrap().iter().map(|t| t["text"].as_str().unwrap()).collect();
    assert_eq!(stdout(&plain).lines().collect::<Vec<_>>(), texts, "plain `translate` output");

    let (status, model) = get(a, "/model");
    assert_eq!(status, 200);
    assert_eq!(model["recipe"], "smoke");
    assert_eq!(model["vocab_size"], 400);
    assert_eq!(model["architecture"]["d_model"], 32);
    assert!(model["checkpoint"].as_str().unwrap().starts_with("step-"));

    // Malformed requests: each refused with a 4xx JSON error naming what is wrong.
    let many = json!({ "src": vec!["Hallo."; 300] }).to_string();
    let long_chars = json!({ "src": ["x".repeat(5000)] }).to_string();
    let long_tokens = json!({ "src": [vec!["Haus"; 200].join(" ")] }).to_string();
    let bad: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("bad JSON", b"{\"src\": [".to_vec(), 400, "EOF while parsing"),
        ("empty body", Vec::new(), 400, "body"),
        ("not UTF-8", b"{\"src\": [\"\xff\xfe\"]}".to_vec(), 400, "src"),
        ("trailing bytes", b"{\"src\": [\"a\"]} {}".to_vec(), 400, "trailing"),
        ("src a string", br#"{"src": "Hallo"}"#.to_vec(), 400, "src"),
        ("src holds null", br#"{"src": [null]}"#.to_vec(), 400, "src[0]"),
        ("no src", br#"{"beam": 2}"#.to_vec(), 400, "src"),
        ("empty src", br#"{"src": []}"#.to_vec(), 400, "src"),
        ("beam a string", br#"{"src": ["a"], "beam": "x"}"#.to_vec(), 400, "beam"),
        ("beam negative", br#"{"src": ["a"], "beam": -1}"#.to_vec(), 400, "beam"),
        ("beam 0", br#"{"src": ["a"], "beam": 0}"#.to_vec(), 400, "beam"),
        ("beam past the vocabulary", br#"{"src": ["a"], "beam": 100000}"#.to_vec(), 400, "beam"),
        ("n_best past the beam", br#"{"src": ["a"], "beam": 2, "n_best": 3}"#.to_vec(), 400, "n_best"),
        ("len_penalty negative", br#"{"src": ["a"], "len_penalty": -1}"#.to_vec(), 400, "len_penalty"),
        ("unknown field", br#"{"src": ["a"], "bem": 2}"#.to_vec(), 400, "unknown field `bem`"),
        ("a JSON array", br#"[1, 2]"#.to_vec(), 400, "invalid type"),
        ("too many sentences", many.into_bytes(), 413, "src: 300 sentences"),
        ("a sentence too long", long_chars.into_bytes(), 413, "src[0]: 5000 characters"),
        ("more tokens than the model takes", long_tokens.into_bytes(), 413, "data.max_len"),
    ];
    for (what, body, status, needle) in bad {
        let (got, answer) = post(a, "/translate", &body);
        assert_eq!(got, status, "{what}: {answer}");
        let error = answer["error"].as_str().unwrap_or_else(|| panic!("{what}: no JSON error: {answer}"));
        assert!(error.contains(needle), "{what}: {error:?} lacks {needle:?}");
        assert_eq!(get(a, "/health").0, 200, "still answering after {what}");
    }
    // A body larger than the server takes (refused on its declared length, unread).
    let (status, answer) = exchange(a, b"POST /translate HTTP/1.1\r\nHost: kiln\r\nContent-Length: 2097152\r\nConnection: close\r\n\r\n{\"src\": [\"aaaa");
    assert_eq!(status, 413, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("body: 2097152 bytes"), "{answer}");
    assert_eq!(get(a, "/translate").0, 405);
    let (status, answer) = post(a, "/nowhere", b"{}");
    assert_eq!(status, 404);
    assert!(answer["error"].is_string());
    // Clients that go away: a body shorter than it said, and one that never reads its answer.
    let mut cut = TcpStream::connect(a).unwrap();
    cut.write_all(b"POST /translate HTTP/1.1\r\nHost: kiln\r\nContent-Length: 1000\r\n\r\n{\"src\": [").unwrap();
    drop(cut);
    let mut gone = TcpStream::connect(a).unwrap();
    let body = json!({ "src": INPUT, "beam": 4 }).to_string();
    gone.write_all(format!("POST /translate HTTP/1.1\r\nHost: kiln\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes()).unwrap();
    drop(gone);
    assert_same(&translate(a, &json!({ "src": INPUT })), &cli_n_best(&run, &INPUT, 1, 1), 1);

    // Concurrent clients: each gets the answers to its own sentences, once.
    let lines: Vec<String> = std::fs::read_to_string(root().join("assets/de-en.ding.tsv")).unwrap().lines().skip(5000).take(48).map(|l| l.split('\t').next().unwrap().to_string()).collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let want = cli_n_best(&run, &refs, 1, 1);
    let answers: Vec<(usize, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8).map(|c| {
            let chunk = &lines[c * 6..(c + 1) * 6];
            scope.spawn(move || (c, translate(a, &json!({ "src": chunk, "id": c }))))
        }).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (c, answer) in answers {
        assert_eq!(answer["id"], c);
        assert_same(&answer, &want[c * 6..(c + 1) * 6], 1);
    }
    drop(server);

    // A long batch wait: concurrent requests share batches, and SIGTERM while one is queued
    // answers it before the server exits 0.
    let mut server = start(&run, &["--batch-wait-ms", "1500"]);
    let a = server.address.clone();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4).map(|c| {
            let a = a.as_str();
            scope.spawn(move || translate(a, &json!({ "src": [INPUT[c]] })))
        }).collect();
        for h in handles {
            h.join().unwrap();
        }
    });
    let (_, health) = get(&a, "/health");
    assert_eq!(health["requests"], 4);
    assert!(health["batches"].as_u64().unwrap() < 4, "requests shared batches: {health}");
    let in_flight = std::thread::spawn({
        let a = a.clone();
        move || post(&a, "/translate", json!({ "src": INPUT }).to_string().as_bytes())
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status().unwrap().success());
    let (status, answer) = in_flight.join().unwrap();
    assert_eq!(status, 200, "the request in flight was answered: {answer}");
    let exit = server.child.wait().unwrap();
    assert_eq!(exit.code(), Some(0));
    let mut rest = String::new();
    server.stdout.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("stopped after 5 requests"), "{rest}");
}

fn write_lines(dir: &std::path::Path, lines: &[&str]) -> String {
    let path = dir.join("input.txt");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path.display().to_string()
}

/// Refusals before serving: a language-model run, a missing run, a port in use.
#[test]
fn serve_refuses_what_it_cannot_serve_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    assert_user_error(&kiln(&["serve", &dir.path().join("none").display().to_string()]), &["recipe.toml"]);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let run = dir.path().join("run").display().to_string();
    let o = kiln(&["train", &smoke(), "--run-dir", &run, "--no-tui", "--set", "train.max_steps=2", "--set", "eval.bleu=false"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_user_error(&kiln(&["serve", &run, "--port", &port]), &["cannot listen", &port]);
    assert_user_error(&kiln(&["serve", &run, "--max-sentences", "0"]), &["--max-sentences"]);
}
