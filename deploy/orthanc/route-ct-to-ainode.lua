-- route-ct-to-ainode.lua: an Orthanc auto-routing rule for pacs-ai-node.
--
-- Orthanc plays the hospital PACS. When a CT series has received no new
-- instance for "StableAge" seconds, Orthanc calls OnStableSeries(); this
-- script then forwards the whole series to the AI node with a C-STORE job.
-- The node sends its results (a SEG and an SR, new series in the same study)
-- back to Orthanc, and this script leaves those alone, so nothing loops.
--
-- Install (see orthanc-example.json next to this file):
--   1. declare the node in "DicomModalities" under the alias NODE_MODALITY:
--        "DicomModalities": { "ainode": [ "AINODE", "10.0.0.20", 11112 ] }
--   2. add this file to "LuaScripts" and restart Orthanc;
--   3. on the node: pacs-ai-node serve --send-to <Orthanc's DicomAet>@<orthanc host>:<DicomPort>
--
-- Written for Orthanc 1.10 (Debian 12's package; Lua 5.3 is built in, no
-- plugin needed). Things worth knowing about Orthanc's Lua:
--   * the script is loaded into more than one Lua context at start-up, so
--     top-level code runs more than once: keep it to constant definitions;
--   * calling RestApiGet()/RestApiPost() at load time (outside a callback)
--     makes Orthanc 1.10 exit during start-up without an error message;
--   * RestApiGet()/RestApiPost() return nil on an error (and Orthanc logs
--     "Lua: Error in RestApiGet() for URI ..."); they do not raise;
--   * callbacks run one at a time in a single Lua thread, so the transfer is
--     an asynchronous job: OnStableSeries returns in milliseconds and the
--     job engine ("ConcurrentJobs") does the C-STORE;
--   * print() goes to Orthanc's log at warning level as "Lua says: ...";
--   * stable-series timers live in memory: a series still inside its
--     StableAge when Orthanc stops is not announced after the restart
--     (send it by hand: POST /modalities/ainode/store with its Orthanc ID);
--   * a store job that fails (node down or refusing) is not retried by
--     Orthanc; OnJobFailure below logs the command that resubmits it.
--
-- Log lines name Orthanc IDs, Series/Study Instance UIDs and AE titles,
-- never patient names or IDs.

-------------------------------------------------------------------------------
-- Settings: change these to match your "DicomModalities" entry.
-------------------------------------------------------------------------------

-- The alias (key) of the node in "DicomModalities".
local NODE_MODALITY = 'ainode'

-- The node's own AE title, used to recognise series that came FROM the node
-- (its results). nil = read it from the modality entry above, which is right
-- when the node calls Orthanc with the AE title it listens as (the default).
local NODE_AET = nil

-- Modalities (0008,0060) that are forwarded. The node runs on CT only.
local ROUTED_MODALITIES = { CT = true }

-- SOP classes the node can read (it refuses every other one with 0x0122,
-- so forwarding them would only cost bandwidth). Checked on the first
-- instance of the series. Set to nil to forward any SOP class.
local ROUTED_SOP_CLASSES = {
  ['1.2.840.10008.5.1.4.1.1.2'] = 'CT Image Storage',
  ['1.2.840.10008.5.1.4.1.1.2.1'] = 'Enhanced CT Image Storage',
}

-- Series whose Image Type (0008,0008) of the first instance holds one of
-- these values are not forwarded. LOCALIZER (scouts) is skipped here because
-- the node would only reject it. DERIVED is deliberately NOT in the default
-- list: many axial reconstructions that the node should see are labelled
-- DERIVED\SECONDARY\AXIAL. Add 'DERIVED' if your scanners label them ORIGINAL.
-- Set to {} to skip this check (it reads one instance's tags).
local SKIP_IMAGE_TYPE_VALUES = { LOCALIZER = true }

-- Priority of the store job in Orthanc's job engine (higher runs first).
local JOB_PRIORITY = 0

-------------------------------------------------------------------------------

local function log(message)
  print('route-ct-to-ainode: ' .. message)
end

-- The node's AE title, from the setting above or from Orthanc's modality
-- entry (looked up on first use: no REST calls at load time, see above).
local nodeAetCache = NODE_AET
local function nodeAet()
  if nodeAetCache == nil then
    local answer = RestApiGet('/modalities/' .. NODE_MODALITY .. '/configuration')
    if answer == nil then
      return nil
    end
    nodeAetCache = ParseJson(answer)['AET']
  end
  return nodeAetCache
end

-- Why this series must not go to the node, or nil when it should.
local function skipReason(seriesId, tags, metadata)
  local modality = tags['Modality'] or ''
  if not ROUTED_MODALITIES[modality] then
    return 'modality ' .. (modality ~= '' and modality or '(none)') .. ' is not routed'
  end

  local aet = nodeAet()
  if aet == nil then
    return 'modality "' .. NODE_MODALITY .. '" is not declared in DicomModalities'
  end
  -- Results the node sent back (SEG, SR) are never CT, but a node configured
  -- to return other objects must not be fed its own output either.
  if metadata['RemoteAET'] ~= nil and metadata['RemoteAET'] == aet then
    return 'it came from the node itself (calling AE ' .. aet .. ')'
  end

  local series = ParseJson(RestApiGet('/series/' .. seriesId) or '{}')
  local instances = series['Instances'] or {}
  if #instances == 0 then
    return 'no instances (deleted meanwhile?)'
  end
  local first = instances[1]
  local instanceMetadata = ParseJson(RestApiGet('/instances/' .. first .. '/metadata?expand') or '{}')
  if instanceMetadata['RemoteAET'] ~= nil and instanceMetadata['RemoteAET'] == aet then
    return 'it came from the node itself (calling AE ' .. aet .. ')'
  end
  local sopClass = instanceMetadata['SopClassUid']
  if ROUTED_SOP_CLASSES ~= nil and sopClass ~= nil and ROUTED_SOP_CLASSES[sopClass] == nil then
    return 'SOP class ' .. sopClass .. ' is not CT Image or Enhanced CT Image'
  end

  if next(SKIP_IMAGE_TYPE_VALUES) ~= nil then
    -- simplified-tags rather than /content/0008-0008: a missing tag would log an error.
    local instanceTags = ParseJson(RestApiGet('/instances/' .. first .. '/simplified-tags') or '{}')
    local imageType = instanceTags['ImageType'] or ''
    for value in string.gmatch(imageType, '[^\\]+') do
      if SKIP_IMAGE_TYPE_VALUES[value] then
        return 'Image Type ' .. imageType .. ' contains ' .. value
      end
    end
  end
  return nil
end

function OnStableSeries(seriesId, tags, metadata)
  local uid = tags['SeriesInstanceUID'] or '?'
  local reason = skipReason(seriesId, tags, metadata)
  if reason ~= nil then
    log('series ' .. uid .. ' not sent to ' .. NODE_MODALITY .. ': ' .. reason)
    return
  end

  -- Asynchronous: Orthanc answers with the job ID at once; the job opens one
  -- association for the whole series, so the node sees it "released whole"
  -- and starts processing without waiting for its own quiet timer.
  -- The body is written out by hand: DumpJson() turns Lua numbers into
  -- strings or doubles, which Orthanc refuses for "Priority" ("Integer value
  -- expected"). Orthanc IDs are hex digits and dashes, safe to embed.
  local request = string.format('{"Resources": ["%s"], "Asynchronous": true, "Priority": %d}',
                                seriesId, JOB_PRIORITY)
  local answer = RestApiPost('/modalities/' .. NODE_MODALITY .. '/store', request)
  if answer == nil then
    log('series ' .. uid .. ': could not create the store job to ' .. NODE_MODALITY .. ' (see the error above)')
    return
  end
  local job = ParseJson(answer)
  log('series ' .. uid .. ' (' .. seriesId .. ', ' .. (tags['SeriesDescription'] or '') ..
      ') stable: store job ' .. (job['ID'] or '?') .. ' to ' .. NODE_MODALITY .. ' submitted')
end

-- Our jobs are the store jobs towards the node's AE title; read from the job
-- itself rather than from a table kept here, so that jobs Orthanc restored
-- from its database after a restart ("SaveJobs") are recognised too.
local function routingJob(jobId)
  local answer = RestApiGet('/jobs/' .. jobId)
  if answer == nil then
    return nil
  end
  local job = ParseJson(answer)
  local content = job['Content'] or {}
  if job['Type'] ~= 'DicomModalityStore' or content['RemoteAet'] ~= nodeAet() then
    return nil
  end
  return job
end

function OnJobSuccess(jobId)
  local job = routingJob(jobId)
  if job ~= nil then
    -- JSON numbers reach Lua as floats: %d prints 112, not 112.0.
    log('store job ' .. jobId .. ' to ' .. NODE_MODALITY .. ' done: ' ..
        string.format('%d', job['Content']['InstancesCount'] or 0) .. ' instances sent')
  end
end

function OnJobFailure(jobId)
  local job = routingJob(jobId)
  if job ~= nil then
    log('store job ' .. jobId .. ' to ' .. NODE_MODALITY .. ' FAILED: ' .. tostring(job['ErrorDescription']) ..
        ' (' .. tostring(job['ErrorDetails']) .. '); resubmit with: POST /jobs/' .. jobId .. '/resubmit')
  end
end
