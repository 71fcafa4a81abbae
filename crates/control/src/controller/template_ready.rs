//! The last phase of a template build (`snapshotting`): a template whose image runs a
//! service is started once, probed and checkpointed, so that its sandboxes start from
//! that checkpoint with the service already answering.

use cubicle_template::Template;

use super::Controller;
use crate::ControlError;

impl Controller {
    /// Makes `template` ready for sandboxes. A template without a service needs
    /// nothing.
    pub async fn prepare_template(&self, template: &Template) -> Result<(), ControlError> {
        if template.meta.sandbox.service.is_none() {
            return Ok(());
        }
        Err(ControlError::NotImplemented(
            "starting and probing a template's service",
        ))
    }
}
