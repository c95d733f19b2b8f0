//! Streamed responses: OpenAI's server-sent events, with keep-alive
//! comments, usage in the last chunk, and the usage record committed before
//! `data: [DONE]`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use std::panic::AssertUnwindSafe;

use futures_util::{FutureExt, StreamExt};
use inferd_core::FinishReason;
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::generate::{Choice, Piece};
use crate::meter::RequestMeter;
use crate::responses::{Envelope, logprobs_json};

enum Msg {
    Piece(u32, Piece),
    Failed(ApiError),
    /// A choice ended (its usage is in the meter).
    Done,
}

/// SSE stream: a task per choice feeds one channel; chunks leave in arrival
/// order. When the client goes away the channels close, the tasks end, and
/// dropping their receivers aborts the sequences in the engine.
pub fn stream(
    envelope: Envelope,
    choices: Vec<Choice>,
    tokenizer: Arc<inferd_models::TextTokenizer>,
    include_usage: bool,
    keepalive: Duration,
    meter: Arc<RequestMeter>,
    inject_panic: bool,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let (msg_tx, mut msg_rx) = mpsc::channel::<Msg>(64);
    let total = choices.len();
    for mut choice in choices {
        let tx = msg_tx.clone();
        tokio::spawn(async move {
            let feed = async {
                while let Some(piece) = choice.next().await {
                    assert!(!inject_panic, "injected fault: a panic while streaming");
                    let msg = match piece {
                        Ok(p) => Msg::Piece(choice.index, p),
                        Err(e) => Msg::Failed(e),
                    };
                    if tx.send(msg).await.is_err() {
                        return false;
                    }
                }
                true
            };
            // A panic ends this choice with an error event; the others and
            // the end of the stream (usage, [DONE]) still come.
            match AssertUnwindSafe(feed).catch_unwind().await {
                Ok(false) => return,
                Ok(true) => {}
                Err(payload) => {
                    crate::conn::panicked("stream", "", payload.as_ref());
                    let failure = ApiError::Internal(
                        "The server failed while streaming this choice; the failure is logged.".into(),
                    );
                    let _ = tx.send(Msg::Failed(failure)).await;
                }
            }
            let _ = tx.send(Msg::Done).await;
        });
    }
    drop(msg_tx);
    let (ev_tx, ev_rx) = mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let mut started = vec![false; total];
        let mut offsets = vec![0usize; total];
        // With tools in play, each choice's text is held until it ends and
        // then sent as content or tool calls.
        let mut held: Vec<(String, Vec<(u32, inferd_core::TokenLogprobs)>)> = vec![Default::default(); total];
        let mut done = 0;
        while let Some(msg) = msg_rx.recv().await {
            let event = match msg {
                Msg::Piece(index, piece) if envelope.tools.is_some() => {
                    let (text, lps) = &mut held[index as usize];
                    text.push_str(&piece.text);
                    lps.extend(piece.logprobs);
                    let Some(finish) = piece.finished else { continue };
                    let lps = (!lps.is_empty()).then(|| logprobs_json(envelope.route, &tokenizer, lps, 0));
                    for chunk in envelope.tool_chunks(index, text, lps, finish.as_str()) {
                        if ev_tx.send(Event::default().data(chunk.to_string())).await.is_err() {
                            return;
                        }
                    }
                    continue;
                }
                Msg::Piece(index, piece) => {
                    let i = index as usize;
                    if piece.text.is_empty()
                        && piece.finished.is_none()
                        && piece.logprobs.is_none()
                        && started[i]
                    {
                        continue;
                    }
                    let lps =
                        piece.logprobs.map(|l| logprobs_json(envelope.route, &tokenizer, &[l], offsets[i]));
                    let finish = piece.finished.map(FinishReason::as_str);
                    let chunk = envelope.chunk(index, &piece.text, lps, finish, !started[i]);
                    started[i] = true;
                    offsets[i] += piece.text.len();
                    Event::default().data(chunk.to_string())
                }
                Msg::Failed(e) => Event::default().data(e.body().to_string()),
                Msg::Done => {
                    done += 1;
                    if done < total {
                        continue;
                    }
                    // On disk before the client sees the end of the stream.
                    let usage = meter.finish().await;
                    if include_usage
                        && ev_tx
                            .send(Event::default().data(envelope.usage_chunk(usage).to_string()))
                            .await
                            .is_err()
                    {
                        return;
                    }
                    Event::default().data("[DONE]")
                }
            };
            if ev_tx.send(event).await.is_err() {
                return;
            }
        }
    });
    let events =
        futures_util::stream::unfold(ev_rx, |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) });
    Sse::new(events.boxed()).keep_alive(KeepAlive::new().interval(keepalive).text("keep-alive"))
}
