//! Prints every topic a device uses, and explains a topic you give it.
//!
//! ```text
//! cargo run -p examples --bin topics -- pump-7
//! cargo run -p examples --bin topics -- pump-7 '$aws/things/pump-7/jobs/j1/update/accepted'
//! ```

use std::process::ExitCode;

use fleet_core::topic::{
    JobsTopic, JobsTopicKind, Role, ShadowOp, ShadowTopic, ShadowTopicKind, Topic, TopicPrefix,
};
use fleet_core::{ShadowName, ThingName};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let thing_arg = args.next().unwrap_or_else(|| "pump-7".to_string());
    let thing = match ThingName::new(&thing_arg) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let prefix = TopicPrefix::AWS;

    println!("Topics of thing {thing}:");
    let config = ShadowName::from_static("config");
    for shadow in [None, Some(config)] {
        let label = shadow.as_ref().map_or("classic shadow".to_string(), |s| {
            format!("named shadow {s}")
        });
        println!("  {label}:");
        for (what, kind) in [
            (
                "publish: ask for the document",
                ShadowTopicKind::Op(ShadowOp::Get, Role::Request),
            ),
            (
                "publish: report state",
                ShadowTopicKind::Op(ShadowOp::Update, Role::Request),
            ),
            (
                "receive: update accepted",
                ShadowTopicKind::Op(ShadowOp::Update, Role::Accepted),
            ),
            (
                "receive: update rejected",
                ShadowTopicKind::Op(ShadowOp::Update, Role::Rejected),
            ),
            (
                "receive: desired differs from reported",
                ShadowTopicKind::Delta,
            ),
        ] {
            let topic = Topic::Shadow(ShadowTopic {
                thing: thing.borrow(),
                shadow: shadow.clone(),
                kind,
            });
            println!("    {:<55} {what}", topic.display(&prefix).to_string());
        }
    }
    println!("  jobs:");
    for (what, kind) in [
        ("receive: the next job changed", JobsTopicKind::NotifyNext),
        (
            "publish: start the next job",
            JobsTopicKind::StartNext(Role::Request),
        ),
        (
            "receive: job started",
            JobsTopicKind::StartNext(Role::Accepted),
        ),
    ] {
        let topic = Topic::Jobs(JobsTopic {
            thing: thing.borrow(),
            kind,
        });
        println!("    {:<55} {what}", topic.display(&prefix).to_string());
    }

    if let Some(text) = args.next() {
        println!();
        match Topic::parse(&prefix, &text) {
            Ok(topic) => println!("{text}\n  is {topic:#?}"),
            Err(e) => {
                eprintln!("{text}\n  is not a fleet topic: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
