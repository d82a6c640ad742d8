//! Build: turn a plan into filesystem trees and artifacts. [`runner`] provisions an image's
//! root filesystem (shell steps in a sandbox, files copied in from the host).

pub mod runner;
